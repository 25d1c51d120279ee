{{/* Chart name. */}}
{{- define "secvec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every resource; kept short so that Ray-generated pod names fit KubeRay's name limits (RayJob 47, RayCronJob less). */}}
{{- define "secvec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 24 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 24 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 24 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "secvec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels; call with (dict "root" $ "component" "mlflow"). */}}
{{- define "secvec.labels" -}}
helm.sh/chart: {{ include "secvec.chart" .root }}
{{ include "secvec.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: secvec
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "secvec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "secvec.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* secvec runtime image. */}}
{{- define "secvec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "secvec.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{- define "secvec.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "secvec.fullname" .) }}
{{- end }}

{{- define "secvec.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "secvec.fullname" .) }}
{{- end }}

{{- define "secvec.postgresql.secretName" -}}
{{- default (include "secvec.postgresql.fullname" .) .Values.postgresql.auth.existingSecret }}
{{- end }}

{{/* The bundled operator's Deployment, named as the kuberay-operator subchart names it. */}}
{{- define "secvec.kuberayOperator.fullname" -}}
{{- $values := index .Values "kuberay-operator" }}
{{- if $values.fullnameOverride }}
{{- $values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "kuberay-operator" $values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "secvec.pipeline.fullname" -}}
{{- printf "%s-pipeline" (include "secvec.fullname" .) }}
{{- end }}

{{/* The pipeline spec as YAML text: a string (`--set-file pipeline.spec=FILE`) as given, a mapping dumped. */}}
{{- define "secvec.pipeline.specYaml" -}}
{{- if kindIs "string" .Values.pipeline.spec }}
{{- .Values.pipeline.spec | trim }}
{{- else }}
{{- toYaml .Values.pipeline.spec }}
{{- end }}
{{- end }}

{{/* Host headers MLflow accepts: the Service in every DNS form, with and without a port, and localhost. */}}
{{- define "secvec.mlflow.allowedHosts" -}}
{{- $svc := include "secvec.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list }}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain) "localhost" "127.0.0.1" }}
{{- $hosts = append $hosts $name }}
{{- $hosts = append $hosts (printf "%s:*" $name) }}
{{- end }}
{{- concat $hosts .Values.mlflow.extraAllowedHosts | join "," }}
{{- end }}

{{/* MLflow tracking URI the pipeline uses. */}}
{{- define "secvec.mlflow.trackingUri" -}}
{{- if .Values.pipeline.mlflowTrackingUri }}
{{- .Values.pipeline.mlflowTrackingUri }}
{{- else }}
{{- printf "http://%s.%s.svc.%s:%d" (include "secvec.mlflow.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.service.port) }}
{{- end }}
{{- end }}

{{/* Environment variables that give MLflow containers MLFLOW_BACKEND_STORE_URI. */}}
{{- define "secvec.mlflow.backendStoreEnv" -}}
{{- if .Values.postgresql.enabled }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "secvec.postgresql.secretName" . }}
      key: {{ .Values.postgresql.auth.passwordKey }}
- name: MLFLOW_BACKEND_STORE_URI
  value: {{ printf "postgresql+psycopg2://%s:$(POSTGRES_PASSWORD)@%s:5432/%s" .Values.postgresql.auth.username (include "secvec.postgresql.fullname" .) .Values.postgresql.auth.database | quote }}
{{- else }}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ required "externalDatabase.existingSecret is required when postgresql.enabled is false" .Values.externalDatabase.existingSecret }}
      key: {{ .Values.externalDatabase.existingSecretKey }}
{{- end }}
{{- end }}

{{/* Environment variables that give MLflow containers the artifact store credentials. */}}
{{- define "secvec.mlflow.artifactEnv" -}}
{{- if eq .Values.mlflow.artifacts.type "s3" }}
{{- with .Values.mlflow.artifacts.s3 }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- if .endpointUrl }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment of the Ray head and workers. */}}
{{- define "secvec.ray.env" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "secvec.mlflow.trackingUri" . | quote }}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.existingSecret }}
      key: username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.auth.existingSecret }}
      key: password
{{- end }}
{{- with .Values.pipeline.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* One Ray pod template; call with (dict "root" $ "role" "head"|"worker"). */}}
{{- define "secvec.ray.podTemplate" -}}
{{- $root := .root }}
{{- $group := ternary $root.Values.rayJob.head $root.Values.rayJob.gpuWorkers (eq .role "head") }}
metadata:
  labels:
    {{- include "secvec.selectorLabels" (dict "root" $root "component" (printf "ray-%s" .role)) | nindent 4 }}
spec:
  {{- with (include "secvec.imagePullSecrets" $root | trim) }}{{ . | nindent 2 }}{{ end }}
  {{- with $root.Values.pipeline.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.rayJob.podSecurityContext | nindent 4 }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .role "head") }}
      image: {{ include "secvec.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      {{- if eq .role "head" }}
      ports:
        - name: gcs
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      env:
        {{- include "secvec.ray.env" $root | trim | nindent 8 }}
      resources:
        {{- if eq .role "head" }}
        {{- toYaml $group.resources | nindent 8 }}
        {{- else }}
        {{- $gpus := int $group.gpusPerWorker }}
        {{- $requests := deepCopy (default dict $group.resources.requests) }}
        {{- $limits := deepCopy (default dict $group.resources.limits) }}
        {{- if gt $gpus 0 }}
        {{- $_ := set $requests $group.gpuResourceName $gpus }}
        {{- $_ := set $limits $group.gpuResourceName $gpus }}
        {{- end }}
        {{- toYaml (dict "requests" $requests "limits" $limits) | nindent 8 }}
        {{- end }}
      volumeMounts:
        - name: pipeline-config
          mountPath: /config
          readOnly: true
        {{- with $root.Values.pipeline.dataVolume }}
        {{- if .claimName }}
        - name: pipeline-data
          mountPath: {{ .mountPath }}
          {{- if .readOnly }}
          readOnly: true
          {{- end }}
        {{- end }}
        {{- end }}
  volumes:
    - name: pipeline-config
      configMap:
        name: {{ include "secvec.pipeline.fullname" $root }}
    {{- with $root.Values.pipeline.dataVolume }}
    {{- if .claimName }}
    - name: pipeline-data
      persistentVolumeClaim:
        claimName: {{ .claimName }}
        {{- if .readOnly }}
        readOnly: true
        {{- end }}
    {{- end }}
    {{- end }}
{{- end }}

{{/* `ray start` parameters as a map of strings, as the CRD requires. */}}
{{- define "secvec.rayStartParams" -}}
{{- $params := dict }}
{{- range $key, $value := . }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* The RayJob spec shared by the one-off RayJob and the RayCronJob's jobTemplate. */}}
{{- define "secvec.rayJobSpec" -}}
entrypoint: secvec run /config/pipeline.yaml
submissionMode: K8sJobMode
shutdownAfterJobFinishes: {{ .Values.rayJob.shutdownAfterJobFinishes }}
ttlSecondsAfterFinished: {{ int .Values.rayJob.ttlSecondsAfterFinished }}
activeDeadlineSeconds: {{ int .Values.rayJob.activeDeadlineSeconds }}
backoffLimit: {{ int .Values.rayJob.backoffLimit }}
rayClusterSpec:
  rayVersion: {{ .Values.rayJob.rayVersion | quote }}
  headGroupSpec:
    rayStartParams:
      {{- include "secvec.rayStartParams" .Values.rayJob.head.rayStartParams | nindent 6 }}
    template:
      {{- include "secvec.ray.podTemplate" (dict "root" . "role" "head") | trim | nindent 6 }}
  workerGroupSpecs:
    - groupName: gpu-workers
      replicas: {{ int .Values.rayJob.gpuWorkers.replicas }}
      minReplicas: {{ int .Values.rayJob.gpuWorkers.replicas }}
      maxReplicas: {{ int .Values.rayJob.gpuWorkers.replicas }}
      rayStartParams:
        {{- include "secvec.rayStartParams" .Values.rayJob.gpuWorkers.rayStartParams | nindent 8 }}
      template:
        {{- include "secvec.ray.podTemplate" (dict "root" . "role" "worker") | trim | nindent 8 }}
{{- end }}
