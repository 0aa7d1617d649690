{{/*
The platform config file (tuneplane.config.PlatformConfig) rendered from the `config` values. The database URL is
not here: it comes from a Secret through TUNEPLANE_DATABASE_URL (or defaults to SQLite in `home` in trial mode).
*/}}
{{- define "tuneplane.platformConfig" -}}
{{- $c := .Values.config -}}
home: {{ $c.home | quote }}
tracking_uri: {{ include "tuneplane.trackingUri" . | quote }}
tracking_auth: {{ .Values.mlflow.auth.enabled }}
teams:
{{- range $c.teams }}
  - name: {{ .name | quote }}
    namespace: {{ include "tuneplane.teamNamespace" . | quote }}
    quota:
      max_concurrent_jobs: {{ dig "quota" "maxConcurrentJobs" 2 . | int }}
      max_gpus: {{ dig "quota" "maxGpus" 8 . | int }}
      max_waiting_jobs: {{ dig "quota" "maxWaitingJobs" 100 . | int }}
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
    {{- /* The node shape: with gpusPerNode set, a job gets one Ray worker pod per node. */}}
    {{- with get $pool "gpusPerNode" }}
    gpus_per_node: {{ . | int }}
    {{- end }}
    {{- with get $pool "cpusPerNode" }}
    cpus_per_node: {{ . }}
    {{- end }}
    {{- with get $pool "memoryPerNode" }}
    memory_per_node: {{ . | quote }}
    {{- end }}
    {{- with get $pool "gpuMemory" }}
    gpu_memory: {{ . | quote }}
    {{- end }}
{{- end }}
{{- else }}
gpu_pools: {}
{{- end }}
auth:
  tokens_file: /etc/tuneplane/auth/tokens.yaml
backend:
  type: kuberay
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
  {{- if .Values.mlflow.auth.enabled }}
  tracking_secret: {{ $c.kuberay.trackingSecret | quote }}
  {{- end }}
  kueue:
    enabled: {{ $c.kueue.enabled }}
    queue_name: {{ $c.kueue.queueName | quote }}
  labels: {{ $c.kuberay.labels | toJson }}
  network_policy:
    {{- include "tuneplane.jobNetworkPolicy" . | nindent 4 }}
validate_data: {{ $c.validateData }}
validation_timeout_s: {{ $c.validationTimeoutSeconds }}
storage_schemes: {{ $c.storageSchemes | toJson }}
reconcile_interval_s: {{ $c.reconcileIntervalSeconds }}
max_job_duration_s: {{ $c.maxJobDurationSeconds | int }}
max_request_bytes: {{ $c.maxRequestBytes | int }}
auto_migrate: {{ $c.autoMigrate }}
{{- end }}

{{/*
backend.network_policy (tuneplane.config.JobNetworkPolicy), as YAML, from config.kuberay.networkPolicy and
networkPolicy.dns. The model's own defaults for the API and MLflow peers are pods labelled tuneplane api/mlflow in
ANY namespace; here they are this release's pods in the release namespace, so another release, or a pod elsewhere
that copies those labels, is not admitted.
*/}}
{{- define "tuneplane.jobNetworkPolicy" -}}
{{- $np := .Values.config.kuberay.networkPolicy }}
{{- $where := "config.kuberay.networkPolicy" }}
{{- $releaseNamespace := dict "kubernetes.io/metadata.name" .Release.Namespace }}
{{- $policy := dict "enabled" $np.enabled }}
{{- $operator := dict "target" $np.kuberayOperator "where" (printf "%s.kuberayOperator" $where) "ingress" true }}
{{- $_ := set $policy "kuberay_operator" (include "tuneplane.jobNetworkTarget" $operator | fromJson) }}
{{- if $np.apiIngress }}
{{- $api := dict "pod_labels" (include "tuneplane.componentSelectorLabels" (list . "api") | fromYaml) }}
{{- $_ = set $api "namespace_labels" $releaseNamespace }}
{{- /* 8265: the Ray dashboard, the model's default (the backend keeps Ray's dashboard port). */}}
{{- $_ = set $policy "api" (dict "peers" (list $api) "ports" (list 8265)) }}
{{- else }}
{{- $_ = set $policy "api" nil }}
{{- end }}
{{- $dns := list }}
{{- range $i, $peer := .Values.networkPolicy.dns }}
{{- $dns = append $dns (include "tuneplane.jobNetworkPeer" (dict "peer" $peer "where" (printf "networkPolicy.dns[%d]" $i)) | fromJson) }}
{{- end }}
{{- $_ = set $policy "dns" $dns }}
{{- if .Values.mlflow.enabled }}
{{- /* Port 5000: the MLflow container's port (a NetworkPolicy sees the pod's port, not the Service's). */}}
{{- $mlflow := dict "pod_labels" (include "tuneplane.componentSelectorLabels" (list . "mlflow") | fromYaml) }}
{{- $_ = set $mlflow "namespace_labels" $releaseNamespace }}
{{- $_ = set $policy "mlflow" (dict "peers" (list $mlflow) "ports" (list 5000)) }}
{{- else }}
{{- $external := deepCopy $np.externalMlflow }}
{{- if not $external.ports }}
{{- /* The port of mlflow.externalUri: an explicit one, else the scheme's. */}}
{{- $url := urlParse .Values.mlflow.externalUri }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" | default (ternary "443" "80" (eq $url.scheme "https")) }}
{{- $_ = set $external "ports" (list ($port | int)) }}
{{- end }}
{{- $args := dict "target" $external "where" (printf "%s.externalMlflow" $where) }}
{{- $_ = set $policy "mlflow" (include "tuneplane.jobNetworkTarget" $args | fromJson) }}
{{- end }}
{{- $storage := dict "target" $np.objectStorage "where" (printf "%s.objectStorage" $where) }}
{{- $_ = set $policy "object_storage" (include "tuneplane.jobNetworkTarget" $storage | fromJson) }}
{{- $extra := list }}
{{- range $i, $target := $np.extraEgress }}
{{- $args := dict "target" $target "where" (printf "%s.extraEgress[%d]" $where $i) }}
{{- $extra = append $extra (include "tuneplane.jobNetworkTarget" $args | fromJson) }}
{{- end }}
{{- $_ = set $policy "extra_egress" $extra }}
{{- toYaml $policy }}
{{- end }}

{{/*
One rule of the job NetworkPolicy (tuneplane.config.NetworkTarget), as JSON, from the values' {cidrs, peers, ports}:
include "tuneplane.jobNetworkTarget" (dict "target" $values "where" "the values' key" "ingress" true). Fails on what
the model refuses: an ingress rule without peers (it would admit everyone), an egress rule with neither peers nor
ports (it would admit everything).
*/}}
{{- define "tuneplane.jobNetworkTarget" -}}
{{- $peers := list }}
{{- range .target.cidrs }}
{{- $peers = append $peers (dict "cidr" .) }}
{{- end }}
{{- range $i, $peer := .target.peers }}
{{- $peers = append $peers (include "tuneplane.jobNetworkPeer" (dict "peer" $peer "where" (printf "%s.peers[%d]" $.where $i)) | fromJson) }}
{{- end }}
{{- $ports := list }}
{{- range .target.ports }}
{{- $ports = append $ports (int .) }}
{{- end }}
{{- if and .ingress (not $peers) }}
{{- fail (printf "%s: give peers or cidrs (an ingress rule without peers admits everyone)" .where) }}
{{- end }}
{{- if not (or $peers $ports) }}
{{- fail (printf "%s: give cidrs, peers or ports (an egress rule with none admits everything)" .where) }}
{{- end }}
{{- toJson (dict "peers" $peers "ports" $ports) }}
{{- end }}

{{/*
A NetworkPolicyPeer of the values as a tuneplane.config.NetworkPeer, as JSON: include "tuneplane.jobNetworkPeer"
(dict "peer" $peer "where" "the values' key"). The two mean the same: no namespaceSelector is the job's own
namespace, `{}` any namespace; no podSelector is every pod of the selected namespaces. The model has labels only,
so a matchExpressions selector is refused rather than dropped (dropping it would widen the peer).
*/}}
{{- define "tuneplane.jobNetworkPeer" -}}
{{- $peer := .peer }}
{{- $out := dict }}
{{- if hasKey $peer "ipBlock" }}
{{- $_ := set $out "cidr" $peer.ipBlock.cidr }}
{{- $_ := set $out "except_cidrs" (get $peer.ipBlock "except" | default list) }}
{{- else }}
{{- range $selector, $field := dict "namespaceSelector" "namespace_labels" "podSelector" "pod_labels" }}
{{- if hasKey $peer $selector }}
{{- $labels := get $peer $selector | default dict }}
{{- if omit $labels "matchLabels" }}
{{- fail (printf "%s.%s: only matchLabels is supported in the job NetworkPolicy" $.where $selector) }}
{{- end }}
{{- $_ := set $out $field (get $labels "matchLabels" | default dict) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}
