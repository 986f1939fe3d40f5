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
The rules the operator needs in every namespace it watches (Role) or cluster-wide (ClusterRole).
Keep in step with the API calls in src/ and the README's RBAC table; tests/chart.rs runs the operator with only
the ServiceAccount's token, so a missing verb fails it.
*/}}
{{- define "fljob-operator.rules" -}}
- apiGroups: ["fljob.dev"]
  resources: ["fljobs", "flsites"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["fljob.dev"]
  resources: ["fljobs/status", "flsites/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["fljob.dev"]
  resources: ["fljobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
  {{- with .Values.rbac.secretNames }}
  resourceNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
