{{- define "immich-ml.name" -}}
{{- printf "%s-immich-ml" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "immich-ml.labels" -}}
app.kubernetes.io/name: immich-ml
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "immich-ml.claim" -}}
{{- .Values.cache.existingClaim | default (printf "%s-cache" (include "immich-ml.name" .)) -}}
{{- end -}}
