#!/bin/sh
# Every ELF file under the given folders: no RUNPATH or RPATH with an empty entry, which
# the loader reads as the working directory (a library planted there would run).
set -eu
bad=0
checked=0
for dir in "$@"; do
  for f in $(find "$dir" -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \)); do
    head -c 4 "$f" | grep -q 'ELF' || continue
    checked=$((checked + 1))
    paths=$(readelf -d "$f" 2>/dev/null | sed -n 's/.*(R\(UN\)\{0,1\}PATH).*\[\(.*\)\]/\2/p')
    for p in $paths; do
      case ":$p:" in
        *::*) echo "$f: empty entry in RUNPATH [$p]"; bad=1 ;;
      esac
    done
  done
done
echo "checked $checked ELF files"
[ "$checked" -gt 0 ] || { echo "no ELF files found under $*"; exit 1; }
exit $bad
