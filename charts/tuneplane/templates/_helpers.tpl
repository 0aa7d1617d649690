{{/*
Name of the chart (app.kubernetes.io/name).
*/}}
{{- define "tuneplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the prefix of every object. Truncated to 63 characters (DNS label limit); the MLflow and test
objects append a suffix, so the prefix is cut to leave room for it.
*/}}
{{- define "tuneplane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version (helm.sh/chart).
*/}}
{{- define "tuneplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "tuneplane.labels" -}}
helm.sh/chart: {{ include "tuneplane.chart" . }}
{{ include "tuneplane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tuneplane
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels shared by all the chart's pods (the default-deny NetworkPolicy selects them).
*/}}
{{- define "tuneplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of one component: include "tuneplane.componentSelectorLabels" (list $ "api").
*/}}
{{- define "tuneplane.componentSelectorLabels" -}}
{{ include "tuneplane.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Labels of one component's objects: include "tuneplane.componentLabels" (list $ "api").
*/}}
{{- define "tuneplane.componentLabels" -}}
{{ include "tuneplane.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Name of the API's ServiceAccount.
*/}}
{{- define "tuneplane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tuneplane.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference, never untagged: include "tuneplane.image" (dict "image" .Values.image "defaultTag" "0.1.0").
*/}}
{{- define "tuneplane.image" -}}
{{- $tag := .image.tag | default .defaultTag | toString }}
{{- if not $tag }}
{{- fail (printf "image %s: set a tag (pinned version)" .image.repository) }}
{{- end }}
{{- if eq $tag "latest" }}
{{- fail (printf "image %s: the tag `latest` is not allowed, pin a version" .image.repository) }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "tuneplane.apiImage" -}}
{{- include "tuneplane.image" (dict "image" .Values.image "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{- define "tuneplane.runtimeImage" -}}
{{- include "tuneplane.image" (dict "image" .Values.runtimeImage "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{- define "tuneplane.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "tuneplane.fullname" .) }}
{{- end }}

{{/*
In-cluster address of the bundled MLflow (fully qualified: the job pods run in other namespaces).
*/}}
{{- define "tuneplane.mlflow.host" -}}
{{- printf "%s.%s.svc.%s" (include "tuneplane.mlflow.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
Tracking URI of the API and the jobs: mlflow.externalUri, else the bundled MLflow's Service.
*/}}
{{- define "tuneplane.trackingUri" -}}
{{- if .Values.mlflow.externalUri }}
{{- .Values.mlflow.externalUri }}
{{- else }}
{{- printf "http://%s:%d" (include "tuneplane.mlflow.host" .) (.Values.mlflow.service.port | int) }}
{{- end }}
{{- end }}

{{/*
Namespace of a team (default: its name).
*/}}
{{- define "tuneplane.teamNamespace" -}}
{{- default .name (get . "namespace") }}
{{- end }}

{{/*
The distinct team namespaces, one per line.
*/}}
{{- define "tuneplane.teamNamespaces" -}}
{{- $seen := dict }}
{{- range .Values.config.teams }}
{{- $_ := set $seen (include "tuneplane.teamNamespace" .) true }}
{{- end }}
{{- keys $seen | sortAlpha | join "\n" }}
{{- end }}

{{/*
imagePullSecrets of every pod.
*/}}
{{- define "tuneplane.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Values checks that JSON Schema cannot express; included by every workload template so `helm template` fails
early with a message that says what to set.
*/}}
{{- define "tuneplane.validateValues" -}}
{{- if .Values.database.sqlite }}
{{- if or (ne (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}
{{- fail "database.sqlite keeps the database in one pod's emptyDir: set replicaCount: 1 and autoscaling.enabled: false (or use PostgreSQL through database.existingSecret)" }}
{{- end }}
{{- else if not .Values.database.existingSecret }}
{{- fail "database.existingSecret is required: name an existing Secret holding the PostgreSQL URL (key database.secretKey); the chart never creates it. For a trial without PostgreSQL set database.sqlite: true and replicaCount: 1" }}
{{- end }}
{{- if not .Values.auth.existingSecret }}
{{- fail "auth.existingSecret is required: name an existing Secret whose key auth.secretKey holds the API tokens file (a YAML list of {sha256, team, role}; `tuneplane token --team T` prints one entry)" }}
{{- end }}
{{- if and .Values.mlflow.enabled .Values.mlflow.externalUri }}
{{- fail "set either mlflow.enabled (bundled MLflow) or mlflow.externalUri (an existing one), not both" }}
{{- end }}
{{- if not (or .Values.mlflow.enabled .Values.mlflow.externalUri) }}
{{- fail "the jobs need an MLflow tracking server: set mlflow.enabled: true or mlflow.externalUri" }}
{{- end }}
{{- if .Values.mlflow.enabled }}
{{- if .Values.mlflow.backendStore.sqlite }}
{{- if ne (int .Values.mlflow.replicaCount) 1 }}
{{- fail "mlflow.backendStore.sqlite keeps MLflow's database in one pod's emptyDir: set mlflow.replicaCount: 1" }}
{{- end }}
{{- else }}
{{- if not .Values.mlflow.backendStore.existingSecret }}
{{- fail "mlflow.backendStore.existingSecret is required: name an existing Secret holding MLflow's database URI (or set mlflow.backendStore.sqlite: true for a trial)" }}
{{- end }}
{{- if not .Values.mlflow.artifactsDestination }}
{{- fail "mlflow.artifactsDestination is required with a database backend store, e.g. s3://bucket/mlartifacts" }}
{{- end }}
{{- end }}
{{- end }}
{{- $teams := dict }}
{{- range .Values.config.teams }}
{{- if hasKey $teams .name }}
{{- fail (printf "config.teams: team name %q appears twice" .name) }}
{{- end }}
{{- $_ := set $teams .name true }}
{{- range (get . "gpu_pools" | default list) }}
{{- if not (hasKey ($.Values.config.gpu_pools | default dict) .) }}
{{- fail (printf "config.teams: GPU pool %q is not defined in config.gpu_pools" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Object-storage settings of the API and MLflow containers: endpoint and region as values, credentials only as
secretKeyRef.
*/}}
{{- define "tuneplane.objectStorageEnv" -}}
{{- $os := .Values.objectStorage }}
{{- with $os.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $os.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $os.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $os.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $os.secretAccessKeyKey | quote }}
{{- end }}
{{- end }}

{{/*
One egress rule (as a one-item list) to a networkPolicy target {cidrs, peers, ports}: with neither cidrs nor
peers, any destination on those ports.
*/}}
{{- define "tuneplane.egressRule" -}}
{{- $to := list }}
{{- range .cidrs }}
{{- $to = append $to (dict "ipBlock" (dict "cidr" .)) }}
{{- end }}
{{- $to = concat $to (.peers | default list) }}
{{- $ports := list }}
{{- range .ports }}
{{- $ports = append $ports (dict "protocol" "TCP" "port" (int .)) }}
{{- end }}
{{- $rule := dict "ports" $ports }}
{{- if $to }}
{{- $_ := set $rule "to" $to }}
{{- end }}
{{- list $rule | toYaml }}
{{- end }}

{{/*
Egress to the cluster DNS (UDP and TCP 53).
*/}}
{{- define "tuneplane.dnsEgressRule" -}}
{{- $ports := list (dict "protocol" "UDP" "port" 53) (dict "protocol" "TCP" "port" 53) }}
{{- $rule := dict "ports" $ports }}
{{- with .Values.networkPolicy.dns }}
{{- $_ := set $rule "to" . }}
{{- end }}
{{- list $rule | toYaml }}
{{- end }}
