#!/usr/bin/env bash
# Validate exported artifacts on a real Linux device over SSH (Raspberry Pi, Jetson, any aarch64 board).
#
#   scripts/validate_ssh.sh [options] USER@HOST ARTIFACTS_DIR
#
# Copies the artifact, the prompt the local validation used and prunefit's runner
# (targets/runner.py: standard library + numpy + the runtime) to the device, runs it there with the
# profile's threads, prefill chunk and decode length, brings back its JSON (load time, prefill
# latency, decode tokens/s, peak RSS on the device) and its tokens/logits, and merges them into
# ARTIFACTS_DIR/report.json + report.md (section "On devices"), compared with the local run.
#
# Options:
#   --runtime onnxruntime|executorch   which artifact (default: onnxruntime); a GenAI folder
#                      (onnx_format: genai) is copied whole and run by onnxruntime-genai's Generator
#   --python PATH      Python on the device (default: python3); needs numpy and the runtime
#                      (pip install numpy onnxruntime  /  onnxruntime-genai  /  executorch)
#   --port N           SSH port            --identity FILE   SSH key
#   --remote-dir DIR   working directory on the device (default: /tmp/prunefit-validate)
#   --dry-run          print every command (quoted) instead of running it
#
# Environment: PRUNEFIT_SSH / PRUNEFIT_SCP (the ssh and scp to use), PRUNEFIT_PYTHON (local Python).
# Every argument is passed as its own word; the one command line the remote shell sees is built
# with printf %q, so no value (paths, host names) is ever interpreted by a shell.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "validate_ssh: $*" >&2; exit "${2:-2}"; }

runtime=onnxruntime python=python3 port="" identity="" remote_dir=/tmp/prunefit-validate dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) runtime=${2:?}; shift 2 ;;
    --python) python=${2:?}; shift 2 ;;
    --port) port=${2:?}; shift 2 ;;
    --identity) identity=${2:?}; shift 2 ;;
    --remote-dir) remote_dir=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || usage
host=$1 out=$2
here=$(cd "$(dirname "$0")/.." && pwd)
local_py=${PRUNEFIT_PYTHON:-$here/.venv/bin/python}

# shellcheck source=scripts/_artifacts.sh
source "$here/scripts/_artifacts.sh"
load_artifacts ...
ssh_bin=${PRUNEFIT_SSH:-ssh} scp_bin=${PRUNEFIT_SCP:-scp}
if [ "$dry" = 0 ]; then
  command -v "$ssh_bin" >/dev/null || die "$ssh_bin is not installed on this machine (apt install openssh-client)" 3
  command -v "$scp_bin" >/dev/null || die "$scp_bin is not installed on this machine (apt install openssh-client)" 3
fi

ssh_opts=(-o BatchMode=yes -o ConnectTimeout=10)
scp_opts=(-o BatchMode=yes -o ConnectTimeout=10)
[ -n "$port" ] && ssh_opts+=(-p "$port") && scp_opts+=(-P "$port")
[ -n "$identity" ] && ssh_opts+=(-i "$identity") && scp_opts+=(-i "$identity")

show() { printf '%q ' "$@"; echo; }
run() { if [ "$dry" = 1 ]; then show "$@"; else "$@"; fi; }
remote() {  # run one command on the device: each word quoted for the remote shell
  local cmd; cmd=$(printf '%q ' "$@")
  run "$ssh_bin" "${ssh_opts[@]}" -- "$host" "$cmd"
}

label=${host#*@}
work="$out/device"
mkdir -p "$work"
result="$work/${label}-${runtime}.json" generation="$work/${label}-${runtime}.npz"

echo "validate_ssh: $runtime artifact from $out on $host (threads $threads, chunk $chunk, $new_tokens tokens)" >&2
remote mkdir -p "$remote_dir" || die "cannot reach $host over ssh (check the host, key and port)" 4
run "$scp_bin" "${scp_opts[@]}" -r -- "${files[@]}" "$inputs" "$here/targets/runner.py" "$here/core/measure.py" "$host:$remote_dir/" \
  || die "copying the artifacts to $host failed" 4
if [ "$dry" = 1 ]; then
  remote "$python" "$remote_dir/runner.py" --runtime "$backend" --artifact "$remote_dir/$artifact" \
    --inputs "$remote_dir/${backend}_inputs.npy" --logits-out "$remote_dir/generation.npz" \
    --threads "$threads" --chunk "$chunk" --new-tokens "$new_tokens" --fill "$fill" ${load_flags[@]+"${load_flags[@]}"}
  show "$local_py" -m targets.device merge "$out" --runtime "$runtime" ${merge_backend[@]+"${merge_backend[@]}"} --label "$label" --result "$result" \
    --generation "$generation"
  exit 0
fi
status=0
remote "$python" "$remote_dir/runner.py" --runtime "$backend" --artifact "$remote_dir/$artifact" \
  --inputs "$remote_dir/${backend}_inputs.npy" --logits-out "$remote_dir/generation.npz" \
  --threads "$threads" --chunk "$chunk" --new-tokens "$new_tokens" --fill "$fill" ${load_flags[@]+"${load_flags[@]}"} >"$result" || status=$?
if [ "$status" = 3 ]; then
  die "the runtime is missing on $host: install it there ($python -m pip install numpy $backend)" 8
elif [ "$status" != 0 ]; then
  die "the runner failed on $host (exit $status); its output is in $result" 4
fi
"$scp_bin" "${scp_opts[@]}" -- "$host:$remote_dir/generation.npz" "$generation" || die "fetching the results from $host failed" 4
(cd "$here" && "$local_py" -m targets.device merge "$out" --runtime "$runtime" ${merge_backend[@]+"${merge_backend[@]}"} --label "$label" \
  --result "$result" --generation "$generation")
echo "validate_ssh: merged into $out/report.md" >&2
