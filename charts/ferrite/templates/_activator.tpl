{{/*
Name of the activator's Deployment, Service, ServiceAccount, RBAC and
PodDisruptionBudget. The operator's --activator-service is
"<release namespace>/<this>".
*/}}
{{- define "ferrite.activatorName" -}}
{{- printf "%s-activator" (include "ferrite.fullname" .) }}
{{- end }}

{{/*
Labels that select the activator pods (immutable once installed: keep them stable).
*/}}
{{- define "ferrite.activatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "ferrite.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: activator
{{- end }}

{{/*
Labels of every activator object: the standard ones, component activator.
*/}}
{{- define "ferrite.activatorLabels" -}}
helm.sh/chart: {{ include "ferrite.chart" . }}
{{ include "ferrite.activatorSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferrite
{{- end }}

{{/*
What the activator reads, and nothing else: ModelDeployments (which exist),
their Services (ClusterIP routing) and pods (which are ready, where). It
writes nothing: the operator points Services at it and scales.
*/}}
{{- define "ferrite.activatorRules" -}}
- apiGroups: ["ferrite.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["services", "pods"]
  verbs: ["get", "list", "watch"]
{{- end }}
