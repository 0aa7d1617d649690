{{/*
The platform config file (tuneplane.config.PlatformConfig) rendered from the `config` values. The database URL is
not here: it comes from a Secret through TUNEPLANE_DATABASE_URL (or defaults to SQLite in `home` in trial mode).
*/}}
{{- define "tuneplane.platformConfig" -}}
{{- $c := .Values.config -}}
backend: kuberay
home: {{ $c.home | quote }}
tracking_uri: {{ include "tuneplane.trackingUri" . | quote }}
teams:
{{- range $c.teams }}
  - name: {{ .name | quote }}
    namespace: {{ include "tuneplane.teamNamespace" . | quote }}
    quota:
      max_concurrent_jobs: {{ dig "quota" "maxConcurrentJobs" 2 . | int }}
      max_gpus: {{ dig "quota" "maxGpus" 8 . | int }}
    gpu_pools: {{ get . "gpuPools" | default list | toJson }}
    priority: {{ get . "priority" | default 0 | int }}
{{- end }}
{{- if $c.gpuPools }}
gpu_pools:
{{- range $name, $pool := $c.gpuPools }}
  {{ $name | quote }}:
    node_selector: {{ get $pool "nodeSelector" | default dict | toJson }}
    tolerations: {{ get $pool "tolerations" | default list | toJson }}
    resource_name: {{ get $pool "resourceName" | default "nvidia.com/gpu" | quote }}
    {{- with get $pool "acceleratorType" }}
    accelerator_type: {{ . | quote }}
    {{- end }}
{{- end }}
{{- else }}
gpu_pools: {}
{{- end }}
auth:
  tokens_file: /etc/tuneplane/auth/tokens.yaml
kuberay:
  image: {{ include "tuneplane.runtimeImage" . | quote }}
  image_pull_policy: {{ .Values.runtimeImage.pullPolicy | quote }}
  ray_version: {{ $c.kuberay.rayVersion | quote }}
  {{- with $c.kuberay.serviceAccount }}
  service_account: {{ . | quote }}
  {{- end }}
  head_cpu: {{ $c.kuberay.headCpu | quote }}
  head_memory: {{ $c.kuberay.headMemory | quote }}
  ttl_seconds_after_finished: {{ $c.kuberay.ttlSecondsAfterFinished | int }}
  backoff_limit: {{ $c.kuberay.backoffLimit | int }}
  storage_path: {{ $c.kuberay.storagePath | quote }}
  storage_env: {{ $c.kuberay.storageEnv | toJson }}
  tracking_uri: {{ include "tuneplane.trackingUri" . | quote }}
  {{- with $c.kuberay.artifactRoot }}
  artifact_root: {{ . | quote }}
  {{- end }}
  kueue:
    enabled: {{ $c.kueue.enabled }}
    queue_name: {{ $c.kueue.queueName | quote }}
  labels: {{ $c.kuberay.labels | toJson }}
validate_data: {{ $c.validateData }}
storage_schemes: {{ $c.storageSchemes | toJson }}
reconcile_interval_s: {{ $c.reconcileIntervalSeconds }}
max_job_duration_s: {{ $c.maxJobDurationSeconds | int }}
max_request_bytes: {{ $c.maxRequestBytes | int }}
auto_migrate: {{ $c.autoMigrate }}
{{- end }}
