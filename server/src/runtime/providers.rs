//! Execution providers: the options a GPU provider starts with, and the
//! rule that a model either runs where it asked to or its load fails with a
//! message that says why (ONNX Runtime would otherwise fall back to the CPU
//! without a word, and a user would only see a slow model).

use std::path::PathBuf;

use ort::ep::ExecutionProviderDispatch;

use super::ExecutionProvider;

/// Settings of the GPU execution providers, server-wide (one pod serves one
/// model on the GPUs it was given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderConfig {
    /// CUDA device ordinal (`device_id`); 0 inside a pod, which sees only
    /// the GPUs assigned to it.
    pub device_id: u32,
    /// Most bytes of device memory ONNX Runtime's arena may take
    /// (`gpu_mem_limit`); `None`: no limit.
    pub gpu_mem_limit: Option<u64>,
    /// Capture the graph once and replay it (`enable_cuda_graph`,
    /// `trt_cuda_graph_enable`); only for models whose inputs have static
    /// shapes (checked at load).
    pub cuda_graph: bool,
    /// Where TensorRT keeps the engines it builds, so that a restart does
    /// not build them again (`trt_engine_cache_path`); `None`: no cache.
    pub trt_engine_cache_dir: Option<PathBuf>,
    /// Let TensorRT pick FP16 kernels (`trt_fp16_enable`).
    pub trt_fp16: bool,
    /// When the requested GPU provider cannot start, load the model on the
    /// CPU (with a warning) instead of failing the load.
    pub allow_cpu_fallback: bool,
}

impl ProviderConfig {
    /// The providers to register for `provider`, most preferred first, each
    /// failing the session build if it cannot start. Empty for the CPU
    /// (ONNX Runtime's default provider).
    pub(crate) fn dispatch(&self, provider: ExecutionProvider) -> Vec<ExecutionProviderDispatch> {
        match provider {
            ExecutionProvider::Cpu => Vec::new(),
            ExecutionProvider::Cuda => vec![self.cuda().build().error_on_failure()],
            // TensorRT takes the subgraphs it can build engines for; CUDA
            // runs the rest on the same device.
            ExecutionProvider::Tensorrt => {
                vec![self.tensorrt().build().error_on_failure(), self.cuda().build().error_on_failure()]
            }
        }
    }

    fn cuda(&self) -> ort::ep::CUDA {
        let mut cuda = ort::ep::CUDA::default().with_device_id(self.device_id as i32);
        if let Some(limit) = self.gpu_mem_limit {
            cuda = cuda.with_memory_limit(limit as usize);
        }
        if self.cuda_graph {
            cuda = cuda.with_cuda_graph(true);
        }
        cuda
    }

    fn tensorrt(&self) -> ort::ep::TensorRT {
        let mut trt = ort::ep::TensorRT::default().with_device_id(self.device_id as i32).with_fp16(self.trt_fp16);
        if let Some(dir) = &self.trt_engine_cache_dir {
            trt = trt
                .with_engine_cache(true)
                .with_engine_cache_path(dir.display())
                .with_timing_cache(true)
                .with_timing_cache_path(dir.display());
        }
        if self.cuda_graph {
            trt = trt.with_cuda_graph(true);
        }
        trt
    }

    /// The provider options as ONNX Runtime names them, for logs and docs.
    pub fn describe(&self, provider: ExecutionProvider) -> Vec<(&'static str, String)> {
        let mut options = Vec::new();
        if !provider.uses_gpu() {
            return options;
        }
        options.push(("device_id", self.device_id.to_string()));
        if let Some(limit) = self.gpu_mem_limit {
            options.push(("gpu_mem_limit", limit.to_string()));
        }
        if self.cuda_graph {
            options.push(("enable_cuda_graph", "1".into()));
        }
        if provider == ExecutionProvider::Tensorrt {
            options.push(("trt_fp16_enable", u8::from(self.trt_fp16).to_string()));
            if let Some(dir) = &self.trt_engine_cache_dir {
                options.push(("trt_engine_cache_path", dir.display().to_string()));
            }
        }
        options
    }
}

/// The message of a load refused because the requested provider could not
/// start: what was asked, what ONNX Runtime said, and how to run on the CPU.
pub(crate) fn cannot_start(provider: ExecutionProvider, error: impl std::fmt::Display) -> String {
    let error = error.to_string();
    let error = error.trim_end_matches('.');
    format!(
        "execution provider '{provider}' cannot start: {error}. The model was not loaded: it needs an NVIDIA GPU, \
         its driver (libcuda.so.1), and the ferrite-server-cuda image (ONNX Runtime built with CUDA). To run it on \
         the CPU instead, allow the fallback (--allow-cpu-fallback, or spec.runtime.allowCpuFallback)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_registers_nothing_and_gpus_fail_loudly() {
        let config = ProviderConfig::default();
        assert!(config.dispatch(ExecutionProvider::Cpu).is_empty());
        let cuda = config.dispatch(ExecutionProvider::Cuda);
        assert_eq!(cuda.iter().map(|d| d.name()).collect::<Vec<_>>(), ["CUDAExecutionProvider"]);
        let trt = config.dispatch(ExecutionProvider::Tensorrt);
        assert_eq!(
            trt.iter().map(|d| d.name()).collect::<Vec<_>>(),
            ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        );
    }

    #[test]
    fn options_reach_onnx_runtime_names() {
        let config = ProviderConfig {
            device_id: 1,
            gpu_mem_limit: Some(2 << 30),
            cuda_graph: true,
            trt_engine_cache_dir: Some("/var/cache/trt".into()),
            trt_fp16: true,
            allow_cpu_fallback: false,
        };
        assert!(config.describe(ExecutionProvider::Cpu).is_empty());
        let cuda = config.describe(ExecutionProvider::Cuda);
        assert!(cuda.contains(&("device_id", "1".into())));
        assert!(cuda.contains(&("gpu_mem_limit", (2u64 << 30).to_string())));
        assert!(cuda.contains(&("enable_cuda_graph", "1".into())));
        assert!(!cuda.iter().any(|(k, _)| k.starts_with("trt_")));
        let trt = config.describe(ExecutionProvider::Tensorrt);
        assert!(trt.contains(&("trt_fp16_enable", "1".into())));
        assert!(trt.contains(&("trt_engine_cache_path", "/var/cache/trt".into())));
        // The ort builders carry the same values.
        let cuda = config.cuda();
        let options = format!("{:?}", cuda);
        assert!(options.contains("gpu_mem_limit") && options.contains("2147483648"), "{options}");
        let trt = format!("{:?}", config.tensorrt());
        assert!(trt.contains("trt_engine_cache_path") && trt.contains("/var/cache/trt"), "{trt}");
    }

    #[test]
    fn the_refusal_says_what_and_how() {
        let message = cannot_start(ExecutionProvider::Cuda, "CUDA execution provider is not supported in this build");
        assert!(message.contains("'cuda' cannot start"));
        assert!(message.contains("not supported in this build"));
        assert!(message.contains("--allow-cpu-fallback") && message.contains("allowCpuFallback"));
    }
}
