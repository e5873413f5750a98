module sluice.dev/e2e/helm-tools

go 1.24.0

require helm.sh/helm/v3 v3.19.0
