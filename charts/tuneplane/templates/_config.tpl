{{/*
The platform config file (tuneplane.config.PlatformConfig): the `config` values as they are, plus what the chart
owns, written from its other values. values.schema.json (generated from that model) has already checked the
values; the API checks the whole file again at start. The database URL is not here: it comes from a Secret
through TUNEPLANE_DATABASE_URL (or defaults to SQLite in `home` in trial mode).
*/}}
{{- define "tuneplane.platformConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- $teams := list }}
{{- range $config.teams }}
{{- /* create_namespace is the chart's (templates/namespaces.yaml), not the platform's. */}}
{{- $teams = append $teams (omit . "create_namespace") }}
{{- end }}
{{- $_ := set $config "teams" $teams }}
{{- $_ = set $config "tracking_uri" (include "tuneplane.trackingUri" .) }}
{{- $_ = set $config "tracking_auth" .Values.mlflow.auth.enabled }}
{{- $_ = set $config "auth" (dict "tokens_file" "/etc/tuneplane/auth/tokens.yaml") }}
{{- $backend := get $config "backend" | default dict }}
{{- $_ = set $backend "type" "kuberay" }}
{{- $_ = set $backend "image" (include "tuneplane.runtimeImage" .) }}
{{- $_ = set $backend "image_pull_policy" .Values.runtimeImage.pullPolicy }}
{{- $_ = set $backend "tracking_uri" (include "tuneplane.trackingUri" .) }}
{{- if not .Values.mlflow.auth.enabled }}
{{- $_ = unset $backend "tracking_secret" }}
{{- end }}
{{- $_ = set $backend "network_policy" (include "tuneplane.jobNetworkPolicy" . | fromYaml) }}
{{- $_ = set $config "backend" $backend }}
{{- toYaml $config }}
{{- end }}

{{/*
backend.network_policy (tuneplane.config.JobNetworkPolicy), as YAML: config.backend.network_policy, with the peers
only the chart knows filled in where the values leave them out. The model's own defaults for the API and MLflow
peers are pods labelled tuneplane api/mlflow in ANY namespace; here they are this release's pods in the release
namespace, so another release, or a pod elsewhere that copies those labels, is not admitted.
*/}}
{{- define "tuneplane.jobNetworkPolicy" -}}
{{- $policy := deepCopy (dig "backend" "network_policy" dict .Values.config) }}
{{- $releaseNamespace := dict "kubernetes.io/metadata.name" .Release.Namespace }}
{{- if not (hasKey $policy "api") }}
{{- $api := dict "pod_labels" (include "tuneplane.componentSelectorLabels" (list . "api") | fromYaml) }}
{{- $_ := set $api "namespace_labels" $releaseNamespace }}
{{- /* 8265: the Ray dashboard, the model's default (the backend keeps Ray's dashboard port). */}}
{{- $_ = set $policy "api" (dict "peers" (list $api) "ports" (list 8265)) }}
{{- end }}
{{- if not (hasKey $policy "dns") }}
{{- $dns := list }}
{{- range $i, $peer := .Values.networkPolicy.dns }}
{{- $dns = append $dns (include "tuneplane.jobNetworkPeer" (dict "peer" $peer "where" (printf "networkPolicy.dns[%d]" $i)) | fromJson) }}
{{- end }}
{{- $_ := set $policy "dns" $dns }}
{{- end }}
{{- if .Values.mlflow.enabled }}
{{- if not (hasKey $policy "mlflow") }}
{{- /* Port 5000: the MLflow container's port (a NetworkPolicy sees the pod's port, not the Service's). */}}
{{- $mlflow := dict "pod_labels" (include "tuneplane.componentSelectorLabels" (list . "mlflow") | fromYaml) }}
{{- $_ := set $mlflow "namespace_labels" $releaseNamespace }}
{{- $_ = set $policy "mlflow" (dict "peers" (list $mlflow) "ports" (list 5000)) }}
{{- end }}
{{- else if not (and (hasKey $policy "mlflow") (kindIs "invalid" (get $policy "mlflow"))) }}
{{- /* mlflow.externalUri, unless the values say `mlflow: null`: the given peers (default: any address) on the
given ports (default: the URI's explicit port, else its scheme's). */}}
{{- $external := get $policy "mlflow" | default dict }}
{{- if not (hasKey $external "peers") }}
{{- $_ := set $external "peers" list }}
{{- end }}
{{- if not (hasKey $external "ports") }}
{{- $url := urlParse .Values.mlflow.externalUri }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" | default (ternary "443" "80" (eq $url.scheme "https")) }}
{{- $_ := set $external "ports" (list ($port | int)) }}
{{- end }}
{{- $_ := set $policy "mlflow" $external }}
{{- end }}
{{- toYaml $policy }}
{{- end }}

{{/*
A NetworkPolicyPeer of the values (networkPolicy.dns) as a tuneplane.config.NetworkPeer, as JSON: include
"tuneplane.jobNetworkPeer" (dict "peer" $peer "where" "the values' key"). The two mean the same: no
namespaceSelector is the job's own namespace, `{}` any namespace; no podSelector is every pod of the selected
namespaces. The model has labels only, so a matchExpressions selector is refused rather than dropped (dropping it
would widen the peer).
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
