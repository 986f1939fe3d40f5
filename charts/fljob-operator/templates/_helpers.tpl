{{/* Names, labels and the few decisions more than one template needs. */}}

{{- define "fljob-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fljob-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fljob-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fljob-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fljob-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fljob-operator.labels" -}}
helm.sh/chart: {{ include "fljob-operator.chart" . }}
{{ include "fljob-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fljob-operator
{{- end }}

{{- define "fljob-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fljob-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fljob-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The namespaces the operator watches when it is not cluster-wide, one per line. */}}
{{- define "fljob-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
{{ . }}
{{- end }}
{{- else }}
{{ .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Where site.create puts the FLSite: site.namespace, else the (first) watched namespace. */}}
{{- define "fljob-operator.siteNamespace" -}}
{{- .Values.site.namespace | default (include "fljob-operator.watchNamespaces" . | trim | splitList "\n" | first) }}
{{- end }}

{{/* "true" when the operator runs with --leader-elect. */}}
{{- define "fljob-operator.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "fljob-operator.leaseName" -}}
{{- default (include "fljob-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The rules the operator needs in every namespace it watches (Role) or cluster-wide (ClusterRole): exactly the calls
it makes (src/controller/), nothing more. tests/chart.rs runs the operator with only the ServiceAccount's token,
so a missing verb fails it; hack/chart-test.sh pins this list, so a new verb is a deliberate change.
*/}}
{{- define "fljob-operator.rules" -}}
# Watch FLJobs (the controller reads them from its cache, never with a GET); patch adds/removes the
# fljob.dev/cleanup finalizer; delete serves ttlSecondsAfterFinished.
- apiGroups: ["fljob.dev"]
  resources: ["fljobs"]
  verbs: ["list", "watch", "patch", "delete"]
# Watch FLSites (the quota pools); the operator never writes their spec.
- apiGroups: ["fljob.dev"]
  resources: ["flsites"]
  verbs: ["list", "watch"]
# FLJob status is written with server-side apply (PATCH).
- apiGroups: ["fljob.dev"]
  resources: ["fljobs/status"]
  verbs: ["patch"]
# FLSite status (the quota ledger) is replaced with a resourceVersion precondition (PUT).
- apiGroups: ["fljob.dev"]
  resources: ["flsites/status"]
  verbs: ["update"]
# Worker pods carry a controller ownerReference with blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin allows only to who may update the owner's finalizers.
- apiGroups: ["fljob.dev"]
  resources: ["fljobs/finalizers"]
  verbs: ["update"]
# Worker pods: watched (by label), read when the cache lags, created, annotated for the abort relay, released from
# their tracking finalizer (a patch) once the job's end is recorded, deleted.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Only to check that the Secrets a job names exist and hold the keys it needs; never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
  {{- with .Values.rbac.secretNames }}
  resourceNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# Events about FLJobs (kube-runtime's Recorder: create, then patch to count repeats).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
