{{/*
Chart name, truncated to the 63 characters a label value may hold.
*/}}
{{- define "ferrite.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every object: the release name, or "<release>-<chart>" when
the release name does not already contain the chart name. 54 characters at most,
so that "<fullname>-operator" still fits in 63.
*/}}
{{- define "ferrite.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the operator's Deployment, Service, Roles and bindings.
*/}}
{{- define "ferrite.operatorName" -}}
{{- printf "%s-operator" (include "ferrite.fullname" .) }}
{{- end }}

{{/*
Chart name and version, as the helm.sh/chart label.
*/}}
{{- define "ferrite.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels of every object.
*/}}
{{- define "ferrite.labels" -}}
helm.sh/chart: {{ include "ferrite.chart" . }}
{{ include "ferrite.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferrite
{{- end }}

{{/*
Labels that select the operator pods (immutable once installed: keep them stable).
*/}}
{{- define "ferrite.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferrite.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "ferrite.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ferrite.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator reconciles, comma-separated: watchNamespaces;
else the release namespace when rbac.clusterWide is false; else "" (all
namespaces).
*/}}
{{- define "ferrite.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- join "," .Values.watchNamespaces }}
{{- else if not .Values.rbac.clusterWide }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
A label map as the operator's flags take it: "k=v,k2=v2".
*/}}
{{- define "ferrite.labelList" -}}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
Operator image reference.
*/}}
{{- define "ferrite.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
ferrite-server image reference for model pods.
*/}}
{{- define "ferrite.serverImage" -}}
{{- printf "%s:%s" .Values.serverImage.repository (default .Chart.AppVersion .Values.serverImage.tag) }}
{{- end }}

{{- define "ferrite.serverCudaImage" -}}
{{- printf "%s:%s" .Values.serverCudaImage.repository (default .Chart.AppVersion .Values.serverCudaImage.tag) }}
{{- end }}

{{/*
The rules the operator needs on the objects it reconciles and owns: exactly
the verbs its code uses (docs/operator-security.md lists the calls). It reads
through watches (list, watch) and writes by server-side apply, which the API
server authorizes as patch, or as create when the object is new. It never
updates or deletes ModelDeployments, Deployments or Services (owner
references let the garbage collector delete them), never reads Secrets or
ConfigMaps (the kubelet mounts a ModelDeployment's Secrets), and only reads
pods.
*/}}
{{- define "ferrite.operatorRules" -}}
- apiGroups: ["ferrite.dev"]
  resources: ["modeldeployments"]
  verbs: ["list", "watch"]
- apiGroups: ["ferrite.dev"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# A ModelDeployment refused by the policy is held at zero replicas.
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["patch"]
# get: the autoscaler checks a Service switched to the activator before
# scaling to zero.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Scale to zero: the <model>-activator slice of a Service in activator mode
# (applied, deleted back in pod mode), and the controller's slices it
# leaves behind when the selector goes (deleted).
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# ... and the v1 Endpoints the endpoints controller leaves behind then (the
# mirroring controller would copy the old pod IPs back into a slice).
- apiGroups: [""]
  resources: ["endpoints"]
  verbs: ["get", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The autoscaler picks pods through their owning ReplicaSet.
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["list", "watch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The settings file of spec.escalation (<name>-escalation), owned like the
# NetworkPolicy: applied, watched for drift, deleted when escalation goes.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
