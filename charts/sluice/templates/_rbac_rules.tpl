{{/*
  Exactly the API access sluice-operator uses. With the leader-election Role
  (rbac.yaml) these are the rules of config/rbac/role.yaml, which the operator's
  own control-plane test runs with; e2e/tests/packaging.rs checks they are equal.
  The chart grants Leases only in the release namespace, not cluster-wide.
*/}}
{{- define "sluice.rules" -}}
- apiGroups: [sluice.dev]
  resources: [connectionpools]
  verbs: [list, watch]
- apiGroups: [sluice.dev]
  resources: [connectionpools/status]
  verbs: [patch]
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
  verbs: [list, watch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
