#!/usr/bin/env bash
# Replace the installed managed plugin with one built from this checkout, keeping its name,
# its settings and its state (the host directory in its "state" mount):
#     plugin/upgrade.sh [NAME[:TAG]]        (default pybridge:latest)
# `docker plugin upgrade` needs a registry to pull from; this does the same without one.
# Networks and running containers stay: the data plane does not depend on the plugin, and
# the new plugin takes over the networks from the same state directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${1:-pybridge:latest}"
[[ "$NAME" == *:* ]] || NAME="$NAME:latest"

# Keep what was set with `docker plugin set` (settable env values and the state source).
settings=()
while IFS= read -r line; do
    [ -n "$line" ] && settings+=("$line")
done < <(docker plugin inspect -f '{{range .Settings.Env}}{{println .}}{{end}}' "$NAME")
state_source="$(docker plugin inspect -f \
    '{{range .Settings.Mounts}}{{if eq .Name "state"}}{{.Source}}{{end}}{{end}}' "$NAME")"

# Build first: if that fails, the installed plugin is left alone.
"$ROOT/plugin/build.sh" --no-create "$NAME"
echo "[plugin] replacing $NAME"
docker plugin disable -f "$NAME" >/dev/null 2>&1 || true  # may be disabled already
docker plugin rm -f "$NAME" >/dev/null
docker plugin create "$NAME" "$ROOT/plugin/build" >/dev/null
rm -rf "$ROOT/plugin/build"
settable=" $(docker plugin inspect -f \
    '{{range .Config.Env}}{{if .Settable}}{{.Name}} {{end}}{{end}}' "$NAME")"
keep=()
for setting in "${settings[@]}"; do
    [[ "$settable" == *" ${setting%%=*} "* ]] && keep+=("$setting")
done
if [ "${#keep[@]}" -gt 0 ]; then
    docker plugin set "$NAME" "${keep[@]}"
fi
[ -z "$state_source" ] || docker plugin set "$NAME" "state.source=$state_source"
docker plugin enable "$NAME" >/dev/null
echo "[plugin] $NAME upgraded and enabled"
