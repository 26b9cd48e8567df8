#!/usr/bin/env bash
# Fetch OHIF's built viewer: the dist/ folder of npm's @ohif/app, at the version in
# deploy/ohif/VERSION, checked against the integrity below. Prints the dist/ folder.
#
#   deploy/ohif/fetch.sh [FOLDER]    # default: .cache/ohif/<version> in the repository
#
# Needs npm (Node.js); nothing is installed, no package script runs (npm pack only
# downloads the tarball). A folder that already holds it is left as it is.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(tr -d '[:space:]' < "$here/VERSION")
# npm's dist.integrity of @ohif/app@3.13.2; change it with VERSION.
integrity="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
folder=${1:-"$here/../../.cache/ohif/$version"}

if [ -f "$folder/dist/index.html" ]; then
    cd "$folder/dist" && pwd
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "fetch.sh: npm is needed (Node.js)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
packed=$(cd "$work" && npm pack --json --silent "@ohif/app@$version")
got=$(printf '%s' "$packed" | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["integrity"])')
if [ "$got" != "$integrity" ]; then
    echo "fetch.sh: @ohif/app@$version has integrity $got, expected $integrity" >&2
    exit 1
fi
tar -xzf "$work/ohif-app-$version.tgz" -C "$work"
[ -f "$work/package/dist/index.html" ] || { echo "fetch.sh: no dist/index.html in @ohif/app@$version" >&2; exit 1; }
mkdir -p "$folder"
rm -rf "$folder/dist.partial"
mv "$work/package/dist" "$folder/dist.partial"
mv "$folder/dist.partial" "$folder/dist"
cd "$folder/dist" && pwd
