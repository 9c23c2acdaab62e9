{{/* Names and labels. */}}
{{- define "fleetpatch.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleetpatch.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fleetpatch.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fleetpatch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fleetpatch.collectorUrl" -}}
{{- if .Values.collector.externalUrl -}}
{{ .Values.collector.externalUrl }}
{{- else -}}
http://{{ include "fleetpatch.fullname" . }}-collector:{{ .Values.collector.port }}
{{- end -}}
{{- end -}}

{{/* The environment every service gets: secrets as FLEETPATCH__SECTION__KEY. */}}
{{- define "fleetpatch.env" -}}
- name: FLEETPATCH_CONFIG
  value: /etc/fleetpatch/fleetpatch.toml
- name: FLEETPATCH__DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.key }}
- name: FLEETPATCH__AMQP__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.amqp.name }}
      key: {{ .Values.secrets.amqp.key }}
{{- end -}}

{{/* Pod-level settings shared by every service. */}}
{{- define "fleetpatch.podSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* Probes on a service's ops port. */}}
{{- define "fleetpatch.probes" -}}
livenessProbe:
  httpGet: { path: /livez, port: {{ .port }} }
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: { path: /readyz, port: {{ .port }} }
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}

{{- define "fleetpatch.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if .root.Values.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}
