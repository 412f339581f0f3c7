{{/*
The chart name, or nameOverride.
*/}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, "<release>" when the release name
contains the chart name, else "<release>-<chart>". Cut to 52 characters: a StatefulSet's
controller-revision-hash label is "<name>-<10-character hash>" and must fit in 63.
*/}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The chart label value: "<name>-<version>".
*/}}
{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end }}

{{/*
Labels that select the pods. Immutable in a StatefulSet: never add to them.
*/}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the pods run as.
*/}}
{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository:tag (tag defaults to appVersion) or repository@digest.
*/}}
{{- define "sluice.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Where the config file is mounted and its full path.
*/}}
{{- define "sluice.configDir" -}}/etc/sluice{{- end }}
{{- define "sluice.configPath" -}}{{ include "sluice.configDir" . }}/sluice.toml{{- end }}

{{/*
config.server, checked: data_dir absolute, both listeners on all interfaces with a port.
*/}}
{{- define "sluice.serverConfig" -}}
{{- $server := dict }}
{{- if kindIs "map" .Values.config }}
{{- $server = .Values.config.server | default dict }}
{{- end }}
{{- toYaml $server }}
{{- end }}

{{/*
config.server.data_dir: where the data volume is mounted.
*/}}
{{- define "sluice.dataDir" -}}
{{- $server := include "sluice.serverConfig" . | fromYaml }}
{{- $dir := $server.data_dir | default "" | toString }}
{{- if not (hasPrefix "/" $dir) }}
{{- fail (printf "config.server.data_dir must be an absolute path (the data volume is mounted there), not %q" $dir) }}
{{- end }}
{{- $dir }}
{{- end }}

{{/*
The port of a listener address (config.server.grpc_addr / http_addr), given as
(list "grpc_addr" .). Refuses loopback addresses, unreachable from outside the pod.
*/}}
{{- define "sluice.listenPort" -}}
{{- $key := index . 0 }}
{{- $root := index . 1 }}
{{- $server := include "sluice.serverConfig" $root | fromYaml }}
{{- $addr := index $server $key | default "" | toString }}
{{- if not (regexMatch "^(\\[[0-9A-Fa-f:.]*\\]|[^:\\[\\]]*):[0-9]+$" $addr) }}
{{- fail (printf "config.server.%s must be HOST:PORT, e.g. 0.0.0.0:PORT, not %q" $key $addr) }}
{{- end }}
{{- if or (hasPrefix "127." $addr) (hasPrefix "localhost:" $addr) (hasPrefix "[::1]:" $addr) }}
{{- fail (printf "config.server.%s is %q: a loopback address cannot be reached from outside the pod; listen on 0.0.0.0:PORT or [::]:PORT" $key $addr) }}
{{- end }}
{{- $port := regexFind "[0-9]+$" $addr | atoi }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "config.server.%s: port %d is not in 1..65535" $key $port) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
config.server.shutdown_timeout in seconds when it is plain seconds or minutes ("30s",
"2m"), else empty. The StatefulSet refuses a terminationGracePeriodSeconds not above it.
*/}}
{{- define "sluice.shutdownSeconds" -}}
{{- $server := include "sluice.serverConfig" . | fromYaml }}
{{- $t := $server.shutdown_timeout | default "30s" | toString | trim }}
{{- if regexMatch "^[0-9]+ *(s|sec|secs|second|seconds)$" $t }}
{{- regexFind "^[0-9]+" $t | atoi }}
{{- else if regexMatch "^[0-9]+ *(m|min|mins|minute|minutes)$" $t }}
{{- mul (regexFind "^[0-9]+" $t | atoi) 60 }}
{{- end }}
{{- end }}

{{/*
A TOML key: bare when it can be, else quoted.
*/}}
{{- define "sluice.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
sluice.toml from .Values.config: one [section] per map, one `key = value` per entry. A JSON
scalar or array of scalars is also a valid TOML value (JSON string escapes are a subset of
TOML's basic-string escapes; integers print without exponent), so toJson renders values.
Nulls are left out; nested maps are refused.
*/}}
{{- define "sluice.toml" -}}
# sluice.toml, rendered by the Helm chart from the values' `config` map.
# Every key and its default: sluice.example.toml. Environment variables
# SLUICE__SECTION__KEY (store URLs and passwords among them) override this file.
{{- if not (kindIs "map" .Values.config) }}
{{- fail "config must be a map of sections" }}
{{- end }}
{{- range $section, $keys := .Values.config }}
{{- if not (kindIs "invalid" $keys) }}
{{- if not (kindIs "map" $keys) }}
{{- fail (printf "config.%s must be a map of keys (the TOML section [%s]), not a %s" $section $section (kindOf $keys)) }}
{{- end }}

[{{ include "sluice.tomlKey" $section }}]
{{- range $key, $value := $keys }}
{{- if kindIs "map" $value }}
{{- fail (printf "config.%s.%s: sluice's config has no nested tables; give a string, number, boolean or list" $section $key) }}
{{- end }}
{{- if kindIs "slice" $value }}
{{- range $value }}
{{- if or (kindIs "map" .) (kindIs "slice" .) }}
{{- fail (printf "config.%s.%s: a list may only hold strings, numbers and booleans" $section $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (kindIs "invalid" $value) }}
{{ include "sluice.tomlKey" $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{ end }}

{{/*
The environment variables that carry store URLs and the ClickHouse password, as a JSON
list of {env, key (in the chart's Secret), refPath, ref (an existing Secret: {name, key}),
plainPath, plain (a value for the chart's Secret)}. Checks that no variable is given both
an existing Secret and a plain value.
*/}}
{{- define "sluice.secretEnvSpecs" -}}
{{- $s := .Values.secret | default dict }}
{{- $pg := .Values.postgres | default dict }}
{{- $ch := .Values.clickhouse | default dict }}
{{- $ar := .Values.archive | default dict }}
{{- $specs := list
  (dict "env" "SLUICE__POSTGRES__URL" "key" "postgres-url" "refPath" "postgres.urlSecret" "ref" ($pg.urlSecret | default dict) "plainPath" "secret.postgresUrl" "plain" ($s.postgresUrl | default "" | toString))
  (dict "env" "SLUICE__CLICKHOUSE__URL" "key" "clickhouse-url" "refPath" "clickhouse.urlSecret" "ref" ($ch.urlSecret | default dict) "plainPath" "secret.clickhouseUrl" "plain" ($s.clickhouseUrl | default "" | toString))
  (dict "env" "SLUICE__CLICKHOUSE__PASSWORD" "key" "clickhouse-password" "refPath" "clickhouse.passwordSecret" "ref" ($ch.passwordSecret | default dict) "plainPath" "secret.clickhousePassword" "plain" ($s.clickhousePassword | default "" | toString))
  (dict "env" "SLUICE__ARCHIVE__URL" "key" "archive-url" "refPath" "archive.urlSecret" "ref" ($ar.urlSecret | default dict) "plainPath" "secret.archiveUrl" "plain" ($s.archiveUrl | default "" | toString))
}}
{{- range $specs }}
{{- if not (kindIs "map" .ref) }}
{{- fail (printf "%s must be a map {name, key}" .refPath) }}
{{- end }}
{{- if and $s.create .plain .ref.name }}
{{- fail (printf "%s comes from both %s.name (%q) and %s: set one of them" .env .refPath .ref.name .plainPath) }}
{{- end }}
{{- end }}
{{- toJson $specs }}
{{- end }}

{{/*
The name of the Secret the chart creates (secret.create).
*/}}
{{- define "sluice.secretName" -}}
{{- include "sluice.fullname" . }}
{{- end }}

{{/*
The chart Secret's data as JSON: { "<key>": "<plain value>" } for every plain value set
(empty unless secret.create).
*/}}
{{- define "sluice.secretData" -}}
{{- $data := dict }}
{{- if .Values.secret.create }}
{{- range (include "sluice.secretEnvSpecs" . | fromJsonArray) }}
{{- if .plain }}
{{- $_ := set $data .key .plain }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $data }}
{{- end }}

{{/*
The env entries for the store URLs and the ClickHouse password (secretKeyRef).
*/}}
{{- define "sluice.secretEnv" -}}
{{- $created := include "sluice.secretData" . | fromJson }}
{{- range (include "sluice.secretEnvSpecs" . | fromJsonArray) }}
{{- $ref := .ref }}
{{- if $ref.name }}
{{- if not $ref.key }}
{{- fail (printf "%s.key must name the key of Secret %q that holds %s" .refPath $ref.name .env) }}
{{- end }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name | quote }}
      key: {{ $ref.key | quote }}
{{- else if hasKey $created .key }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "sluice.secretName" $ | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The stores `sluice migrate` applies migrations to, as "postgres clickhouse" (either may be
missing; empty when neither is configured). A store is configured by its urlSecret, a value
of the chart's Secret, config.<store>.url, or SLUICE__<STORE>__URL in extraEnv.
*/}}
{{- define "sluice.migratableStores" -}}
{{- $env := include "sluice.secretEnv" . }}
{{- $stores := list }}
{{- range list "postgres" "clickhouse" }}
{{- $store := . }}
{{- $var := printf "SLUICE__%s__URL" (upper $store) }}
{{- $found := contains (printf "name: %s" $var) $env }}
{{- $section := index $.Values.config $store }}
{{- if and (kindIs "map" $section) (index $section "url") }}
{{- $found = true }}
{{- end }}
{{- range $.Values.extraEnv }}
{{- if eq (toString .name) $var }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- if $found }}
{{- $stores = append $stores $store }}
{{- end }}
{{- end }}
{{- join " " $stores }}
{{- end }}

{{/*
"true" when PostgreSQL or ClickHouse is configured (then `sluice migrate` has work).
*/}}
{{- define "sluice.hasStore" -}}
{{- if include "sluice.migratableStores" . }}true{{ end }}
{{- end }}

{{/*
The environment of the server and migrate containers.
*/}}
{{- define "sluice.env" -}}
{{- include "sluice.secretEnv" . }}
- name: TMPDIR
  value: /tmp
- name: RUST_LOG
  value: {{ .Values.logLevel | toString | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The volume mounts of the server and migrate containers.
*/}}
{{- define "sluice.volumeMounts" -}}
- name: config
  mountPath: {{ include "sluice.configDir" . }}
  readOnly: true
- name: data
  mountPath: {{ include "sluice.dataDir" . }}
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}
