{{/*
Helpers. "fhir-sidecar.container" and "fhir-sidecar.volumes" are the public sidecar templates: a
parent chart calls them with (dict "Values" (index .Values "fhir-sidecar") "Release" .Release),
so everything they use comes from .Values and .Release only (never .Chart, which would be the
parent's there).
*/}}

{{- define "fhir-sidecar.name" -}}
{{- default "fhir-sidecar" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fhir-sidecar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "fhir-sidecar.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fhir-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fhir-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fhir-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fhir-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fhir-sidecar.configMapName" -}}
{{- if .Values.existingConfigMap.name -}}
{{- .Values.existingConfigMap.name -}}
{{- else -}}
{{- include "fhir-sidecar.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "fhir-sidecar.configKey" -}}
{{- if .Values.existingConfigMap.name -}}{{ .Values.existingConfigMap.key }}{{- else -}}config.yaml{{- end -}}
{{- end -}}

{{- define "fhir-sidecar.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{/*
The config file as the sidecar reads it: the user's `config` with empty sections dropped and
admin.listen set from `admin`, so probes and listener always agree.
*/}}
{{- define "fhir-sidecar.configFile" -}}
{{- $cfg := dict -}}
{{- range $section, $body := .Values.config -}}
{{- if $body -}}{{- $_ := set $cfg $section (deepCopy $body) -}}{{- end -}}
{{- end -}}
{{- $admin := get $cfg "admin" | default dict -}}
{{- $_ := set $admin "listen" (printf "%s:%d" .Values.admin.host (int .Values.admin.port)) -}}
{{- if include "fhir-sidecar.adminOnService" . -}}
{{- $svc := include "fhir-sidecar.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) -}}
{{- $_ := set $admin "allowed_hosts" (concat (get $admin "allowed_hosts" | default list) $names | uniq) -}}
{{- end -}}
{{- if include "fhir-sidecar.jwksIngress" . -}}
{{- $_ := set $admin "allowed_hosts" (append (get $admin "allowed_hosts" | default list) .Values.jwksIngress.host | uniq) -}}
{{- end -}}
{{- $_ := set $cfg "admin" $admin -}}
{{- if and .Values.tracing.endpoint (not (get $cfg "tracing")) -}}
{{- $tracing := dict "endpoint" .Values.tracing.endpoint "sample_ratio" .Values.tracing.sampleRatio -}}
{{- if .Values.tracing.serviceName -}}{{- $_ := set $tracing "service_name" .Values.tracing.serviceName -}}{{- end -}}
{{- $_ := set $cfg "tracing" $tracing -}}
{{- end -}}
{{- if eq .Values.mode "gateway" -}}
{{- /* Apps reach the listeners by the Service's names: their Host must be answered (421 otherwise). */ -}}
{{- $svc := include "fhir-sidecar.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- range $name, $conn := (get $cfg "connections" | default dict) -}}
{{- if and $conn (get $conn "listen") -}}
{{- $_ := set $conn "allowed_hosts" (concat (get $conn "allowed_hosts" | default list) $names | uniq) -}}
{{- end -}}
{{- end -}}
{{- $proxy := get $cfg "proxy" | default dict -}}
{{- if get $proxy "listen" -}}
{{- $_ := set $proxy "allowed_hosts" (concat (get $proxy "allowed_hosts" | default list) $names | uniq) -}}
{{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
"true" when the gateway Service carries the admin port: asked for with service.exposeAdmin, or
needed by the ServiceMonitor. Empty otherwise.
*/}}
{{- define "fhir-sidecar.adminOnService" -}}
{{- if and (eq .Values.mode "gateway") (or .Values.service.exposeAdmin .Values.serviceMonitor.enabled) -}}true{{- end -}}
{{- end -}}

{{/*
"true" when the JWK Set Ingress (and its Service) is rendered. Empty otherwise.
*/}}
{{- define "fhir-sidecar.jwksIngress" -}}
{{- if and (eq .Values.mode "gateway") .Values.jwksIngress.enabled -}}true{{- end -}}
{{- end -}}

{{/*
The listeners besides admin, as YAML {listeners: [{name, host, port, source}]}. `name` is a valid
port name (IANA service name: at most 15 characters, [a-z0-9-], a letter): the connection's name
when it is one, else "fhir-<port>".
*/}}
{{- define "fhir-sidecar.listeners" -}}
{{- $out := list -}}
{{- if .Values.existingConfigMap.name -}}
{{- range .Values.existingConfigMap.listenerPorts -}}
{{- $out = append $out (dict "name" .name "host" "" "port" (int .port) "source" (printf "existingConfigMap.listenerPorts[%s]" .name)) -}}
{{- end -}}
{{- else -}}
{{- $listens := list -}}
{{- with .Values.config.proxy -}}{{- with .listen -}}
{{- $listens = append $listens (dict "name" "proxy" "listen" . "source" "config.proxy.listen") -}}
{{- end -}}{{- end -}}
{{- range $name, $conn := .Values.config.connections -}}
{{- with $conn.listen -}}
{{- $portName := printf "fhir-%s" (regexFind "[0-9]+$" (toString .)) -}}
{{- if and (le (len $name) 15) (regexMatch "^[a-z0-9]+(-[a-z0-9]+)*$" $name) (regexMatch "[a-z]" $name) (not (has $name (list "admin" "proxy"))) -}}
{{- $portName = $name -}}
{{- end -}}
{{- $listens = append $listens (dict "name" $portName "listen" . "source" (printf "config.connections.%s.listen" $name)) -}}
{{- end -}}
{{- end -}}
{{- range $listens -}}
{{- $listen := toString .listen -}}
{{- if not (regexMatch "^.+:[0-9]+$" $listen) -}}
{{- fail (printf "fhir-sidecar: %s is %q; expected HOST:PORT, for example 0.0.0.0:8081" .source $listen) -}}
{{- end -}}
{{- $out = append $out (dict "name" .name "host" (regexReplaceAll ":[0-9]+$" $listen "") "port" (atoi (regexFind "[0-9]+$" $listen)) "source" .source) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "listeners" $out) -}}
{{- end -}}

{{/*
Seconds Kubernetes waits after SIGTERM before it kills the sidecar: config.shutdown's delay and
drain plus 5 s, or terminationGracePeriodSeconds when set (never less). Public: a parent chart
uses it in its own pod spec.
*/}}
{{- define "fhir-sidecar.terminationGracePeriodSeconds" -}}
{{- $shutdown := .Values.config.shutdown | default dict -}}
{{- $delay := $shutdown.delay_seconds | default 0 | float64 -}}
{{- $drain := 30.0 -}}
{{- if hasKey $shutdown "drain_seconds" -}}{{- $drain = $shutdown.drain_seconds | float64 -}}{{- end -}}
{{- $needed := addf $delay $drain 5 | ceil | int -}}
{{- $given := .Values.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $given -}}
{{- $needed -}}
{{- else if lt (int $given) $needed -}}
{{- fail (printf "fhir-sidecar: terminationGracePeriodSeconds is %d, less than config.shutdown.delay_seconds + drain_seconds + 5 = %d: Kubernetes would kill requests still draining (remove it to get %d)" (int $given) $needed $needed) -}}
{{- else -}}
{{- int $given -}}
{{- end -}}
{{- end -}}

{{/*
Cross-field checks the schema cannot express clearly. Called by the ConfigMap template (always
rendered unless existingConfigMap is used) and by the container template.
*/}}
{{- define "fhir-sidecar.validate" -}}
{{- $v := .Values -}}
{{- $listeners := (include "fhir-sidecar.listeners" . | fromYaml).listeners -}}
{{- $loopback := "^(127\\.[0-9.]+|localhost|\\[?::1\\]?)$" -}}
{{- if and $v.existingConfigMap.name (or $v.config.connections $v.config.basic_auth $v.config.oauth $v.config.proxy $v.config.admin) -}}
{{- fail "fhir-sidecar: set either `config` or `existingConfigMap.name`, not both" -}}
{{- end -}}
{{- with $v.config.admin -}}{{- if hasKey . "listen" -}}
{{- fail (printf "fhir-sidecar: remove config.admin.listen; the chart sets it to %s:%d from admin.host and admin.port so that the probes reach it" $v.admin.host (int $v.admin.port)) -}}
{{- end -}}{{- end -}}
{{- if eq $v.mode "gateway" -}}
{{- if not $listeners -}}
{{- if $v.existingConfigMap.name -}}
{{- fail "fhir-sidecar: gateway mode with existingConfigMap needs existingConfigMap.listenerPorts (the ports its listeners use) so the Service can expose them" -}}
{{- else -}}
{{- fail "fhir-sidecar: gateway mode needs at least one listener: give connections a `listen: 0.0.0.0:<port>` or set config.proxy.listen" -}}
{{- end -}}
{{- end -}}
{{- range $listeners -}}
{{- if regexMatch $loopback .host -}}
{{- fail (printf "fhir-sidecar: %s binds to %s, which the gateway Service cannot reach; use 0.0.0.0:%d" .source .host (int .port)) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if not $v.sidecar.exposeListeners -}}
{{- range $listeners -}}
{{- if and .host (not (regexMatch $loopback .host)) -}}
{{- fail (printf "fhir-sidecar: %s binds to %s; in sidecar mode listeners must use 127.0.0.1 so only this pod's containers get the credentials (or set sidecar.exposeListeners: true)" .source .host) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.serviceMonitor.enabled -}}
{{- fail "fhir-sidecar: serviceMonitor needs mode: gateway (it scrapes the gateway Service); in sidecar mode scrape the admin port of your own pods" -}}
{{- end -}}
{{- if $v.jwksIngress.enabled -}}
{{- fail "fhir-sidecar: jwksIngress needs mode: gateway; in sidecar mode route /.well-known/jwks.json to your own pods' admin port" -}}
{{- end -}}
{{- if $v.networkPolicy.enabled -}}
{{- fail "fhir-sidecar: networkPolicy needs mode: gateway; in sidecar mode the pod belongs to your workload, so write its NetworkPolicy there" -}}
{{- end -}}
{{- end -}}
{{- if include "fhir-sidecar.jwksIngress" . -}}
{{- if not $v.jwksIngress.host -}}
{{- fail "fhir-sidecar: jwksIngress.enabled needs jwksIngress.host, the public host name of the JWK Set URL (https://<host>/.well-known/jwks.json)" -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled (not $v.jwksIngress.controllers) -}}
{{- fail "fhir-sidecar: jwksIngress.controllers is empty while networkPolicy.enabled: the NetworkPolicy would block the ingress controller; list its pods (NetworkPolicyPeer list)" -}}
{{- end -}}
{{- end -}}
{{- range $listeners -}}
{{- if eq (int .port) (int $v.admin.port) -}}
{{- fail (printf "fhir-sidecar: %s uses port %d, which is admin.port" .source (int .port)) -}}
{{- end -}}
{{- end -}}
{{- $mounted := dict -}}
{{- range $v.secrets -}}
{{- if hasKey $mounted (printf "secrets/%s" .name) -}}{{- fail (printf "fhir-sidecar: two entries in `secrets` are named %q" .name) -}}{{- end -}}
{{- $_ := set $mounted (printf "secrets/%s" .name) true -}}
{{- end -}}
{{- range $v.caBundles -}}
{{- if hasKey $mounted (printf "ca/%s" .name) -}}{{- fail (printf "fhir-sidecar: two entries in `caBundles` are named %q" .name) -}}{{- end -}}
{{- if eq (len (compact (list (.configMap | default "") (.secret | default "")))) 1 | not -}}
{{- fail (printf "fhir-sidecar: caBundles entry %q needs exactly one of configMap or secret" .name) -}}
{{- end -}}
{{- $_ := set $mounted (printf "ca/%s" .name) true -}}
{{- end -}}
{{- if not $v.existingConfigMap.name -}}
{{- range $ref := include "fhir-sidecar.fileRefs" $v.config | fromYaml | default dict | dig "refs" list -}}
{{- $path := toString $ref.path -}}
{{- if not (hasPrefix "/" $path) -}}
{{- fail (printf "fhir-sidecar: %s is the relative path %q; it would resolve inside the config's ConfigMap, which holds only config.yaml. Use /etc/fhir-sidecar/secrets/<name>/... or /etc/fhir-sidecar/ca/<name>/..." $ref.field $path) -}}
{{- end -}}
{{- if hasPrefix "/etc/fhir-sidecar/" $path -}}
{{- $parts := splitList "/" (trimPrefix "/etc/fhir-sidecar/" $path) -}}
{{- if or (lt (len $parts) 3) (not (hasKey $mounted (printf "%s/%s" (index $parts 0) (index $parts 1)))) -}}
{{- fail (printf "fhir-sidecar: %s is %q, but nothing is mounted there: add an entry to `secrets` (mounted at /etc/fhir-sidecar/secrets/<name>/) or `caBundles` (at /etc/fhir-sidecar/ca/<name>/)" $ref.field $path) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Every file the config refers to, as YAML {refs: [{field, path}]}: the places named in the config
file contract (admin token, passwords, client secrets, keys, TLS files).
*/}}
{{- define "fhir-sidecar.fileRefs" -}}
{{- $refs := list -}}
{{- $tlsKeys := list "ca_bundle" "client_cert" "client_key" -}}
{{- with .admin -}}{{- with .token_file -}}
{{- $refs = append $refs (dict "field" "config.admin.token_file" "path" .) -}}
{{- end -}}{{- end -}}
{{- range $name, $def := .basic_auth -}}
{{- with $def.password_file -}}
{{- $refs = append $refs (dict "field" (printf "config.basic_auth.%s.password_file" $name) "path" .) -}}
{{- end -}}
{{- end -}}
{{- range $name, $def := .oauth -}}
{{- range $key := list "client_secret_file" "private_key_file" "next_private_key_file" "previous_private_key_file" -}}
{{- with get $def $key -}}
{{- $refs = append $refs (dict "field" (printf "config.oauth.%s.%s" $name $key) "path" .) -}}
{{- end -}}
{{- end -}}
{{- range $key := $tlsKeys -}}
{{- with get ($def.tls | default dict) $key -}}
{{- $refs = append $refs (dict "field" (printf "config.oauth.%s.tls.%s" $name $key) "path" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $name, $conn := .connections -}}
{{- range $key := $tlsKeys -}}
{{- with get ($conn.tls | default dict) $key -}}
{{- $refs = append $refs (dict "field" (printf "config.connections.%s.tls.%s" $name $key) "path" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "refs" $refs) -}}
{{- end -}}

{{/*
The sidecar container (a list item). Include it under `containers:`, or under `initContainers:`
with sidecar.native: true.
*/}}
{{- define "fhir-sidecar.container" -}}
{{- include "fhir-sidecar.validate" . -}}
{{- $v := .Values -}}
{{- $configPath := printf "/etc/fhir-sidecar/config/%s" (include "fhir-sidecar.configKey" .) -}}
- name: {{ $v.sidecar.containerName }}
  image: {{ include "fhir-sidecar.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if and (eq $v.mode "sidecar") $v.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args: ["run", "-c", {{ $configPath | quote }}]
  env:
    - name: FHIR_SIDECAR_CONFIG
      value: {{ $configPath | quote }}
    # mitmproxy's CA store and other state: an emptyDir, since the root filesystem is read-only.
    - name: FHIR_SIDECAR_STATE_DIR
      value: /var/lib/fhir-sidecar
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: admin
      containerPort: {{ int $v.admin.port }}
      protocol: TCP
    {{- if or (eq $v.mode "gateway") $v.sidecar.exposeListeners }}
    {{- range (include "fhir-sidecar.listeners" . | fromYaml).listeners }}
    - name: {{ .name }}
      containerPort: {{ int .port }}
      protocol: TCP
    {{- end }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /readyz
      port: admin
    {{- toYaml $v.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: admin
    {{- toYaml $v.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: admin
    {{- toYaml $v.probes.readiness | nindent 4 }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: fhir-sidecar-config
      mountPath: /etc/fhir-sidecar/config
      readOnly: true
    - name: fhir-sidecar-state
      mountPath: /var/lib/fhir-sidecar
    - name: fhir-sidecar-tmp
      mountPath: /tmp
    {{- /* Whole-directory mounts only: a subPath mount never sees a rotated Secret. */}}
    {{- range $v.secrets }}
    - name: fhir-sidecar-secret-{{ .name }}
      mountPath: /etc/fhir-sidecar/secrets/{{ .name }}
      readOnly: true
    {{- end }}
    {{- range $v.caBundles }}
    - name: fhir-sidecar-ca-{{ .name }}
      mountPath: /etc/fhir-sidecar/ca/{{ .name }}
      readOnly: true
    {{- end }}
    {{- if $v.callerKeysToken.enabled }}
    - name: fhir-sidecar-kube
      mountPath: /var/run/secrets/fhir-sidecar/kube
      readOnly: true
    {{- end }}
{{- end -}}

{{/* The volumes the container mounts (list items for the pod's `volumes:`). */}}
{{- define "fhir-sidecar.volumes" -}}
- name: fhir-sidecar-config
  configMap:
    name: {{ include "fhir-sidecar.configMapName" . }}
- name: fhir-sidecar-state
  emptyDir:
    sizeLimit: 64Mi
- name: fhir-sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- range .Values.secrets }}
- name: fhir-sidecar-secret-{{ .name }}
  secret:
    secretName: {{ .secretName }}
    # 0444: readable whatever UID the container gets; only this container mounts the volume.
    defaultMode: 292
    {{- if .optional }}
    optional: true
    {{- end }}
    {{- with .items }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- range .Values.caBundles }}
- name: fhir-sidecar-ca-{{ .name }}
  {{- if .configMap }}
  configMap:
    name: {{ .configMap }}
  {{- else }}
  secret:
    secretName: {{ .secret }}
  {{- end }}
    defaultMode: 292
{{- end }}
{{- if .Values.callerKeysToken.enabled }}
# Only for fetching the cluster's key set (callers.*.jwks_url with bearer_token_file).
- name: fhir-sidecar-kube
  projected:
    defaultMode: 292
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ int .Values.callerKeysToken.expirationSeconds }}
          {{- with .Values.callerKeysToken.audience }}
          audience: {{ . }}
          {{- end }}
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
{{- end }}
{{- end -}}
