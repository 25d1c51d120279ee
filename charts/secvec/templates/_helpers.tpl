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

{{/* secvec runtime image: <registry>/<path>@<digest> when a digest is given, else :<tag>, where the
tag defaults to the GPU build of the chart's appVersion (the default spec sets use_gpu: true). A
repository without a registry host would resolve to Docker Hub, which has no secvec image: refused. */}}
{{- define "secvec.image" -}}
{{- $repository := required "image.repository is required: the registry path of the image built from the Dockerfile, e.g. registry.example.com/secvec (docs/kubernetes.md, step 1)" .Values.image.repository }}
{{- $host := first (splitList "/" $repository) }}
{{- if not (and (contains "/" $repository) (or (contains "." $host) (contains ":" $host) (eq $host "localhost"))) }}
{{- fail (printf "image.repository %q names no registry host: it would be pulled from Docker Hub, which has no secvec image; push the image built from the Dockerfile to your registry and give its path, e.g. registry.example.com/secvec" $repository) }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.tag) }}
{{- end }}
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

{{/* Labels and annotations of every Ray pod; call with (dict "root" $ "component" "ray-head"). */}}
{{- define "secvec.ray.podMetadata" -}}
labels:
  {{- include "secvec.selectorLabels" (dict "root" .root "component" .component) | nindent 2 }}
  {{- with .root.Values.rayJob.kueueQueueName }}
  kueue.x-k8s.io/queue-name: {{ . }}
  {{- end }}
{{- with .root.Values.rayJob.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* One Ray pod template; call with (dict "root" $ "role" "head"|"worker"). */}}
{{- define "secvec.ray.podTemplate" -}}
{{- $root := .root }}
{{- $group := ternary $root.Values.rayJob.head $root.Values.rayJob.gpuWorkers (eq .role "head") }}
metadata:
  {{- include "secvec.ray.podMetadata" (dict "root" $root "component" (printf "ray-%s" .role)) | nindent 2 }}
spec:
  {{- with (include "secvec.imagePullSecrets" $root | trim) }}{{ . | nindent 2 }}{{ end }}
  {{- with $root.Values.pipeline.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  # The pipeline never calls the Kubernetes API: no token in the Ray pods.
  automountServiceAccountToken: false
  {{- with $root.Values.rayJob.priorityClassName }}
  priorityClassName: {{ . }}
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
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .role "head") }}
      image: {{ include "secvec.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.rayJob.containerSecurityContext | nindent 8 }}
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
        {{- $sizing := fromYaml (include "secvec.workerSizing" $root) }}
        {{- $gpus := int $sizing.gpus }}
        {{- $requests := deepCopy (default dict $group.resources.requests) }}
        {{- $limits := deepCopy (default dict $group.resources.limits) }}
        {{- $_ := set $requests "cpu" $sizing.cpu }}
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

{{/* The submitter pod of K8sJobMode (KubeRay runs `ray job submit` in it). Without this template KubeRay
builds one from the head image with no securityContext, no pull secrets and the default service
account's token: rejected under Pod Security "restricted" and stuck in ImagePullBackOff with a private
registry, while the Ray cluster holds its GPUs until activeDeadlineSeconds. KubeRay fills in the command
and the dashboard address (and the Ray token when auth is on). */}}
{{- define "secvec.ray.submitterTemplate" -}}
metadata:
  labels:
    {{- include "secvec.selectorLabels" (dict "root" . "component" "ray-submitter") | nindent 4 }}
spec:
  restartPolicy: Never
  {{- with (include "secvec.imagePullSecrets" . | trim) }}{{ . | nindent 2 }}{{ end }}
  automountServiceAccountToken: false
  securityContext:
    {{- toYaml .Values.rayJob.podSecurityContext | nindent 4 }}
  {{- with .Values.rayJob.head.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.rayJob.head.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-job-submitter
      image: {{ include "secvec.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      securityContext:
        {{- toYaml .Values.containerSecurityContext | nindent 8 }}
      env:
        # The `ray` CLI writes nothing but may look for a home directory: the writable emptyDir.
        - name: HOME
          value: /tmp
      resources:
        {{- toYaml .Values.rayJob.submitter.resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: tmp
      emptyDir: {}
{{- end }}

{{/* `ray start` parameters as a map of strings, as the CRD requires. */}}
{{- define "secvec.rayStartParams" -}}
{{- $params := dict }}
{{- range $key, $value := . }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* Checks shared by every RayJob the chart renders: the data volume the spec needs. */}}
{{- define "secvec.pipeline.checks" -}}
{{- if and (include "secvec.pipeline.usesDataVolume" .) (not .Values.pipeline.dataVolume.claimName) }}
{{- fail (printf "the pipeline spec reads or writes %s but pipeline.dataVolume.claimName is empty: give an existing ReadWriteMany claim holding the data sets (docs/kubernetes.md, \"The default pipeline and its data\")" .Values.pipeline.dataVolume.mountPath) }}
{{- end }}
{{- end }}

{{/* The RayJob spec shared by the one-off RayJob and the RayCronJob's jobTemplate. */}}
{{- define "secvec.rayJobSpec" -}}
{{- include "secvec.pipeline.checks" . }}
{{- $sizing := fromYaml (include "secvec.workerSizing" .) }}
{{- $ttl := int .Values.rayJob.ttlSecondsAfterFinished }}
{{- $keep := max $ttl (int .Values.rayJob.deleteRayJobAfterSeconds) }}
entrypoint: secvec run /config/pipeline.yaml
submissionMode: K8sJobMode
submitterPodTemplate:
  {{- include "secvec.ray.submitterTemplate" . | trim | nindent 2 }}
# Clean-up (KubeRay's deletionStrategy, mutually exclusive with shutdownAfterJobFinishes): the Ray cluster
# goes ttlSecondsAfterFinished after the job ends, the RayJob itself (and with it its submitter Job)
# deleteRayJobAfterSeconds after, so that scheduled runs do not pile up. Results live in MLflow.
deletionStrategy:
  deletionRules:
    {{- range $condition := list (dict "jobStatus" "SUCCEEDED") (dict "jobStatus" "FAILED") (dict "jobDeploymentStatus" "Failed") }}
    - condition: {{ merge (dict "ttlSeconds" $ttl) $condition | toJson }}
      policy: DeleteCluster
    - condition: {{ merge (dict "ttlSeconds" $keep) $condition | toJson }}
      policy: DeleteSelf
    {{- end }}
activeDeadlineSeconds: {{ int .Values.rayJob.activeDeadlineSeconds }}
preRunningDeadlineSeconds: {{ int .Values.rayJob.preRunningDeadlineSeconds }}
backoffLimit: {{ int .Values.rayJob.backoffLimit }}
rayClusterSpec:
  rayVersion: {{ .Values.rayJob.rayVersion | quote }}
  {{- if .Values.rayJob.auth.enabled }}
  # Ray token authentication (Ray 2.52+): KubeRay creates the token Secret and gives it to every Ray
  # container and the submitter; without it any pod could run code through the dashboard or GCS.
  authOptions:
    mode: token
  {{- end }}
  headGroupSpec:
    rayStartParams:
      {{- include "secvec.rayStartParams" .Values.rayJob.head.rayStartParams | nindent 6 }}
    template:
      {{- include "secvec.ray.podTemplate" (dict "root" . "role" "head") | trim | nindent 6 }}
  workerGroupSpecs:
    - groupName: gpu-workers
      replicas: {{ $sizing.replicas }}
      minReplicas: {{ $sizing.replicas }}
      maxReplicas: {{ $sizing.replicas }}
      rayStartParams:
        {{- include "secvec.rayStartParams" .Values.rayJob.gpuWorkers.rayStartParams | nindent 8 }}
      template:
        {{- include "secvec.ray.podTemplate" (dict "root" . "role" "worker") | trim | nindent 8 }}
{{- end }}

{{/* The pipeline spec as a mapping (a `--set-file` string parsed), for the checks below. */}}
{{- define "secvec.pipeline.specMap" -}}
{{- if kindIs "string" .Values.pipeline.spec }}
{{- $spec := fromYaml .Values.pipeline.spec }}
{{- if hasKey $spec "Error" }}
{{- fail (printf "pipeline.spec is not a YAML mapping: %s" $spec.Error) }}
{{- end }}
{{- toYaml $spec }}
{{- else }}
{{- toYaml .Values.pipeline.spec }}
{{- end }}
{{- end }}

{{/* A Kubernetes CPU quantity ("4", "500m", 2) as millicores. */}}
{{- define "secvec.milliCpu" -}}
{{- $text := toString . }}
{{- if hasSuffix "m" $text }}{{ trimSuffix "m" $text | int }}{{ else }}{{ mulf (float64 $text) 1000 | int }}{{ end }}
{{- end }}

{{/* The GPU worker group, derived from the spec's `scaling` with the pipeline's own defaults
(workflows/specs.py ScalingSpec: 2 workers, use_gpu false, 1 CPU each): one Ray Train worker per pod,
`num_workers` pods, one GPU each when `use_gpu`. Values that disagree with the spec fail the render:
Ray Train would otherwise wait for resources that never come, with the GPUs held. YAML:
{replicas, gpus, cpu, memory (bytes or "")}. */}}
{{- define "secvec.workerSizing" -}}
{{- $spec := fromYaml (include "secvec.pipeline.specMap" .) }}
{{- $scaling := default dict $spec.scaling }}
{{- $perWorker := default (dict "CPU" 1) $scaling.resources_per_worker }}
{{- $workers := int (default 2 $scaling.num_workers) }}
{{- $useGpu := and (hasKey $scaling "use_gpu") $scaling.use_gpu }}
{{- $gpus := 0 }}
{{- if $useGpu }}
{{- $gpus = hasKey $perWorker "GPU" | ternary $perWorker.GPU 1 }}
{{- end }}
{{- if ne (float64 $gpus) (float64 (int $gpus)) }}
{{- fail (printf "pipeline spec scaling.resources_per_worker.GPU is %v: Kubernetes gives whole GPUs; use 1 per worker" $gpus) }}
{{- end }}
{{- $gpus = int $gpus }}
{{- if gt $gpus 1 }}
{{- fail (printf "pipeline spec asks %d GPUs per Ray Train worker, but each worker trains on one device (ray.train.torch.get_device): set scaling.resources_per_worker.GPU to 1 and raise scaling.num_workers instead" $gpus) }}
{{- end }}
{{- with .Values.rayJob.gpuWorkers }}
{{- if and (not (kindIs "invalid" .replicas)) (ne (int .replicas) $workers) }}
{{- fail (printf "rayJob.gpuWorkers.replicas is %d but the pipeline spec's scaling.num_workers is %d: Ray Train would wait forever for the missing workers; leave rayJob.gpuWorkers.replicas unset (it follows the spec) or change the spec" (int .replicas) $workers) }}
{{- end }}
{{- if and (not (kindIs "invalid" .gpusPerWorker)) (ne (int .gpusPerWorker) $gpus) }}
{{- fail (printf "rayJob.gpuWorkers.gpusPerWorker is %d but the pipeline spec asks %d GPU(s) per worker (scaling.use_gpu / resources_per_worker.GPU): leave rayJob.gpuWorkers.gpusPerWorker unset (it follows the spec) or change the spec" (int .gpusPerWorker) $gpus) }}
{{- end }}
{{- end }}
{{- $specCpu := hasKey $perWorker "CPU" | ternary $perWorker.CPU 1 }}
{{- $cpu := toString $specCpu }}
{{- with .Values.rayJob.gpuWorkers.resources.requests }}
{{- if .cpu }}
{{- if lt (int (include "secvec.milliCpu" .cpu)) (int (mulf (float64 $specCpu) 1000)) }}
{{- fail (printf "rayJob.gpuWorkers.resources.requests.cpu is %v but the pipeline spec asks %v CPUs per worker (scaling.resources_per_worker.CPU): Ray would never place the workers" .cpu $specCpu) }}
{{- end }}
{{- $cpu = toString .cpu }}
{{- end }}
{{- end }}
replicas: {{ $workers }}
gpus: {{ $gpus }}
cpu: {{ $cpu | quote }}
{{- end }}

{{/* Does the pipeline spec refer to the data volume's mount path (e.g. `path: /data/x.jsonl`, `work_dir: /data/...`)? "true" or "". */}}
{{- define "secvec.pipeline.usesDataVolume" -}}
{{- $mount := trimSuffix "/" .Values.pipeline.dataVolume.mountPath }}
{{- if regexMatch (printf "(^|[\\s:\"'\\[{,=])%s(/|[\\s\"',}\\]]|$)" (regexQuoteMeta $mount)) (include "secvec.pipeline.specYaml" .) }}true{{ end }}
{{- end }}
