{{/*
  Exactly the API access sluice-operator uses. Kept equal to the rules in
  config/rbac/role.yaml by a test (e2e/tests/packaging.rs).
*/}}
{{- define "sluice.rules" -}}
- apiGroups: [sluice.dev]
  resources: [connectionpools]
  verbs: [get, list, watch]
- apiGroups: [sluice.dev]
  resources: [connectionpools/status]
  verbs: [get, patch, update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
