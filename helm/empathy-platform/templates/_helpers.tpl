{{/* ---------- names: one helper per resource name ---------- */}}

{{- define "edp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "edp.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "edp.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "edp.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* KubeRay derives pod and service names from these: keep them short. */}}
{{- define "edp.rayClusterName" -}}{{ include "edp.fullname" . | trunc 40 | trimSuffix "-" }}-ray{{- end }}
{{- define "edp.rayServiceName" -}}{{ include "edp.fullname" . | trunc 40 | trimSuffix "-" }}-serve{{- end }}
{{/* KubeRay 1.5.1 refuses RayJob names over 47 characters: the prefix gives way to the job's name (<= 24). */}}
{{- define "edp.rayJobName" -}}{{ printf "%s-%s" (include "edp.fullname" .root | trunc (int (sub 46 (len .name))) | trimSuffix "-") .name }}{{- end }}
{{- define "edp.rayHeadServiceName" -}}{{ include "edp.rayClusterName" . }}-head-svc{{- end }}
{{- define "edp.mlflowName" -}}{{ include "edp.fullname" . }}-mlflow{{- end }}
{{- define "edp.postgresName" -}}{{ include "edp.fullname" . }}-postgres{{- end }}
{{- define "edp.postgresSecretName" -}}{{ default (printf "%s-postgres" (include "edp.fullname" .)) .Values.postgres.existingSecret }}{{- end }}
{{- define "edp.seaweedfsName" -}}{{ include "edp.fullname" . }}-seaweedfs{{- end }}
{{- define "edp.s3SecretName" -}}{{ default (printf "%s-s3" (include "edp.fullname" .)) .Values.s3.existingSecret }}{{- end }}
{{- define "edp.dashboardName" -}}{{ include "edp.fullname" . }}-dashboard{{- end }}
{{- define "edp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ default (include "edp.fullname" .) .Values.serviceAccount.name }}{{ else }}{{ default "default" .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{/* ---------- labels ---------- */}}

{{- define "edp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "edp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Every Ray pod (RayCluster, RayJob, RayService) carries this: NetworkPolicies select Ray pods by it. */}}
{{- define "edp.rayPodLabels" -}}
{{ include "edp.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{/* ---------- endpoints ---------- */}}

{{- define "edp.mlflowUri" -}}
{{- if .Values.mlflow.enabled }}http://{{ include "edp.mlflowName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.port }}{{ else }}{{ .Values.mlflow.trackingUri }}{{ end }}
{{- end }}

{{- define "edp.s3Endpoint" -}}
{{- if .Values.seaweedfs.enabled }}http://{{ include "edp.seaweedfsName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.seaweedfs.s3Port }}{{ else }}{{ .Values.s3.endpoint }}{{ end }}
{{- end }}

{{- define "edp.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag }}{{- end }}

{{/* ---------- shared blocks ---------- */}}

{{/* S3 credentials, always from a Secret. */}}
{{- define "edp.s3CredentialEnv" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ include "edp.s3SecretName" . }}, key: {{ .Values.s3.accessKeyIdKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "edp.s3SecretName" . }}, key: {{ .Values.s3.secretAccessKeyKey }}}
{{- end }}

{{/* S3 endpoint and credentials for boto3, MLflow and Ray Train (pyarrow reads AWS_ENDPOINT_URL too). */}}
{{- define "edp.s3Env" -}}
{{ include "edp.s3CredentialEnv" . }}
- name: AWS_ENDPOINT_URL
  value: {{ include "edp.s3Endpoint" . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ include "edp.s3Endpoint" . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}

{{/* Environment of every Ray container. */}}
{{- define "edp.rayEnv" -}}
{{ include "edp.s3Env" . }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "edp.mlflowUri" . | quote }}
- name: EDP_HOME
  value: /home/ray/app
- name: EDP_CHECKPOINT_URI
  value: {{ printf "s3://%s/%s" .Values.s3.bucket .Values.s3.checkpointPrefix | quote }}
- name: EDP_NODE_TYPES
  value: {{ include "edp.nodeTypes" . | quote }}
{{- with .Values.ray.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The worker node types the cluster can have (JSON), so a sweep on a cluster that autoscales from zero can
check that its trials fit a node type before any such node exists (cluster.sweep.check_placement). */}}
{{- define "edp.nodeTypes" -}}
{{- $types := list }}
{{- range $name, $g := .Values.ray.workerGroups }}
{{- $max := ternary $g.maxReplicas $g.replicas $.Values.ray.autoscaler.enabled }}
{{- if and $g.enabled (gt (int $max) 0) }}
{{- $lim := $g.resources.limits }}
{{- $types = append $types (dict "group" $name "max" (int $max) "CPU" (toString (default $lim.cpu (get (default (dict) $g.rayStartParams) "num-cpus"))) "GPU" (int (default 0 (get $lim "nvidia.com/gpu")))) }}
{{- end }}
{{- end }}
{{- toJson $types }}
{{- end }}

{{/* Pod template of one Ray node. Args: dict "root" $ "kind" (head|worker) "group" <values> "probes" bool. */}}
{{- define "edp.rayPodTemplate" -}}
{{- $root := .root }}
metadata:
  labels:
    {{- include "edp.rayPodLabels" $root | nindent 4 }}
spec:
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .kind "head") }}
      image: {{ include "edp.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      resources:
        {{- toYaml .group.resources | nindent 8 }}
      env:
        {{- include "edp.rayEnv" $root | nindent 8 }}
        {{- if and (eq .kind "head") $root.Values.monitoring.enabled }}
        {{- with $root.Values.monitoring }}
        # The Ray dashboard's metrics views query Prometheus and embed Grafana panels.
        - {name: RAY_PROMETHEUS_HOST, value: {{ .prometheusHost | quote }}}
        - {name: RAY_GRAFANA_HOST, value: {{ .grafana.host | quote }}}
        - {name: RAY_GRAFANA_IFRAME_HOST, value: {{ default .grafana.host .grafana.iframeHost | quote }}}
        {{- end }}
        {{- end }}
      ports:
        {{- if eq .kind "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: 8000}
        - {name: metrics, containerPort: 8080}
      volumeMounts:
        - {name: shared-mem, mountPath: /dev/shm}
        - {name: ray-logs, mountPath: /tmp/ray}
  volumes:
    - name: shared-mem
      emptyDir: {medium: Memory, sizeLimit: {{ .group.shmSize }}}
    - name: ray-logs
      emptyDir: {}
{{- end }}

{{/* The RayCluster spec shared by RayCluster, RayJob.rayClusterSpec and RayService.rayClusterConfig. */}}
{{- define "edp.rayClusterSpec" -}}
{{- $v := .Values.ray }}
rayVersion: {{ $v.version | quote }}
{{- with $v.authOptions }}
authOptions:
  {{- toYaml . | nindent 2 }}
{{- end }}
enableInTreeAutoscaling: {{ $v.autoscaler.enabled }}
{{- if $v.autoscaler.enabled }}
autoscalerOptions:
  version: v2
  idleTimeoutSeconds: {{ $v.autoscaler.idleTimeoutSeconds }}
  upscalingMode: {{ $v.autoscaler.upscalingMode }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  resources:
    {{- toYaml $v.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
{{- end }}
headGroupSpec:
  serviceType: {{ $v.head.serviceType }}
  rayStartParams:
    {{- toYaml $v.head.rayStartParams | nindent 4 }}
  template:
    {{- include "edp.rayPodTemplate" (dict "root" . "kind" "head" "group" $v.head) | nindent 4 }}
workerGroupSpecs:
{{- range $name, $g := $v.workerGroups }}
{{- if $g.enabled }}
  - groupName: {{ $name }}
    replicas: {{ $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    rayStartParams:
      {{- toYaml (default (dict) $g.rayStartParams) | nindent 6 }}
    template:
      {{- include "edp.rayPodTemplate" (dict "root" $ "kind" "worker" "group" $g) | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---------- cross-field checks the schema cannot express ---------- */}}

{{- define "edp.validate" -}}
{{- if and (not .Values.seaweedfs.enabled) (not .Values.s3.existingSecret) }}
{{- fail "s3.existingSecret is required with an external S3 endpoint (create it: kubectl create secret generic empathy-s3-credentials --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...), or set seaweedfs.enabled=true" }}
{{- end }}
{{- if and .Values.mlflow.enabled (not .Values.postgres.enabled) (not .Values.externalDatabase.existingSecret) }}
{{- fail "externalDatabase.existingSecret is required when postgres.enabled=false (a Secret with the backend URI under externalDatabase.uriKey)" }}
{{- end }}
{{- range $name, $g := .Values.ray.workerGroups }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "ray.workerGroups.%s: minReplicas (%v) must not exceed maxReplicas (%v)" $name $g.minReplicas $g.maxReplicas) }}
{{- end }}
{{- end }}
{{- if and .Values.monitoring.enabled .Values.monitoring.requireCRDs (not (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}
{{- fail "monitoring.enabled=true needs the Prometheus Operator's CRDs (API monitoring.coreos.com/v1), which this cluster does not serve: install them first (helm install prometheus-operator-crds prometheus-community/prometheus-operator-crds --version 33.0.1, or kube-prometheus-stack), or set monitoring.enabled=false" }}
{{- end }}
{{- if and (not .Values.mlflow.enabled) (not .Values.mlflow.trackingUri) (or .Values.rayCluster.enabled .Values.serve.enabled .Values.sweeps.jobs) }}
{{- fail "mlflow.trackingUri is required when mlflow.enabled=false (Ray jobs and Serve log to and load from MLflow)" }}
{{- end }}
{{- end }}

{{- /* The Serve config file (files/serve/<serve.configFile>, parsed), its applications cut down to the ones
named in serve.applications, as YAML. Fails naming the file or the application that is missing. */}}
{{- define "edp.serveConfig" -}}
{{- $path := printf "files/serve/%s" .Values.serve.configFile }}
{{- $text := .Files.Get $path }}
{{- if not $text }}
{{- fail (printf "serve.configFile: %s does not exist in the chart" $path) }}
{{- end }}
{{- $config := fromYaml $text }}
{{- if hasKey $config "Error" }}
{{- fail (printf "serve.configFile: %s is not valid YAML: %s" $path $config.Error) }}
{{- end }}
{{- $byName := dict }}
{{- range $config.applications }}
{{- $_ := set $byName .name . }}
{{- end }}
{{- $chosen := list }}
{{- range .Values.serve.applications }}
{{- if not (hasKey $byName .) }}
{{- fail (printf "serve.applications: %s has no application %q (it has: %s)" $path . (keys $byName | sortAlpha | join ", ")) }}
{{- end }}
{{- $chosen = append $chosen (get $byName .) }}
{{- end }}
{{- toYaml (set (deepCopy $config) "applications" $chosen) }}
{{- end }}
