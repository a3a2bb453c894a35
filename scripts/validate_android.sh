#!/usr/bin/env bash
# Validate exported artifacts on an Android phone over adb.
#
#   scripts/validate_android.sh [options] ARTIFACTS_DIR
#
# Two ways to run on the phone:
#   --python PATH   a Python on the device with numpy and the runtime (e.g. Termux:
#                   pkg install python python-numpy && pip install onnxruntime): prunefit's runner
#                   (targets/runner.py) prefills the validation prompt, greedy-decodes with the KV
#                   cache and reports load time, prefill latency, decode tokens/s and peak RSS; its
#                   tokens are compared with the local run.
#   --runner BIN    a native runner built for arm64-v8a (ExecuTorch's executor_runner / llama_main,
#                   onnxruntime_perf_test, ...), pushed and run with the arguments after `--`
#                   ({model} is replaced by the artifact's path on the phone: the .pte / .onnx, or
#                   the folder with onnx_format: genai, which onnxruntime-genai's apps load and
#                   runner.py runs with the Generator (pip install onnxruntime-genai)); a constant sh loop
#                   samples its VmHWM from /proc until it exits, so the peak RSS and wall time
#                   are reported.
# Either way the result is merged into ARTIFACTS_DIR/report.json + report.md ("On devices").
#
# Options: --serial S (adb -s), --runtime onnxruntime|executorch (default executorch),
#          --remote-dir DIR (default /data/local/tmp/prunefit), --dry-run (print, run nothing).
# Environment: PRUNEFIT_ADB (the adb to use), PRUNEFIT_PYTHON (local Python).
# Every argument is its own word; the one command string `adb shell` passes to the phone's shell is
# built with printf %q, so no value is interpreted by a shell.
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "validate_android: $*" >&2; exit "${2:-2}"; }

runtime=executorch serial="" python="" runner="" remote_dir=/data/local/tmp/prunefit dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --serial) serial=${2:?}; shift 2 ;;
    --runtime) runtime=${2:?}; shift 2 ;;
    --python) python=${2:?}; shift 2 ;;
    --runner) runner=${2:?}; shift 2 ;;
    --remote-dir) remote_dir=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || usage
out=$1; shift
runner_args=()
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || die "unexpected argument '$1' (native runner arguments go after --)"
  shift; runner_args=("$@")
fi
[ -n "$python" ] && [ -n "$runner" ] && die "give --python or --runner, not both"
[ -z "$python" ] && [ -z "$runner" ] && python=/data/data/com.termux/files/usr/bin/python3
here=$(cd "$(dirname "$0")/.." && pwd)
local_py=${PRUNEFIT_PYTHON:-$here/.venv/bin/python}
adb_bin=${PRUNEFIT_ADB:-adb}

# shellcheck source=scripts/_artifacts.sh
source "$here/scripts/_artifacts.sh"
load_artifacts android
[ -z "$runner" ] || [ -f "$runner" ] || die "native runner $runner does not exist"

adb=("$adb_bin")
[ -n "$serial" ] && adb+=(-s "$serial")
show() { printf '%q ' "$@"; echo; }
run() { if [ "$dry" = 1 ]; then show "$@"; else "$@"; fi; }
shell() { local cmd; cmd=$(printf '%q ' "$@"); run "${adb[@]}" shell "$cmd"; }

if [ "$dry" = 0 ]; then
  command -v "$adb_bin" >/dev/null || die "$adb_bin is not installed on this machine (Android platform-tools)" 3
  "${adb[@]}" get-state >/dev/null 2>&1 || "${adb[@]}" devices | grep -q "device$" \
    || die "no Android device is connected (adb devices lists none; enable USB debugging)" 4
fi

label=${serial:-android}
work="$out/device"
mkdir -p "$work"
result="$work/${label}-${runtime}.json" generation="$work/${label}-${runtime}.npz"
echo "validate_android: $runtime artifact from $out on $label (threads $threads)" >&2

shell mkdir -p "$remote_dir"
run "${adb[@]}" push "${files[@]}" "$inputs" "$here/targets/runner.py" "$here/core/measure.py" "$remote_dir/" >&2 \
  || die "adb push to $remote_dir failed" 4

if [ -n "$runner" ]; then
  run "${adb[@]}" push "$runner" "$remote_dir/runner-bin" >&2 || die "adb push of $runner failed" 4
  args=()
  for a in "${runner_args[@]}"; do args+=("${a//\{model\}/$remote_dir/$model_ref}"); done
  # A constant snippet: the binary and its arguments are positional parameters ("$@"), never code.
  # shellcheck disable=SC2016
  snippet='chmod 755 "$1"; start=$(date +%s%N); "$@" >/dev/null & pid=$!; peak=0;'
  snippet+=' while kill -0 "$pid" 2>/dev/null; do'
  snippet+=' v=$(sed -n "s/^VmHWM:[[:space:]]*\([0-9]*\).*/\1/p" "/proc/$pid/status" 2>/dev/null);'
  snippet+=' [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v; sleep 0.05; done;'
  snippet+=' wait "$pid"; rc=$?; end=$(date +%s%N);'
  snippet+=' echo "{\"runner\": \"native\", \"exit_code\": $rc, \"wall_s\": $(( (end - start) / 1000000 ))e-3,'
  snippet+=' \"model_peak_mib\": $(( peak / 1024 ))}"'
  if [ "$dry" = 1 ]; then
    shell sh -c "$snippet" sh "$remote_dir/runner-bin" "${args[@]}"
    exit 0
  fi
  shell sh -c "$snippet" sh "$remote_dir/runner-bin" "${args[@]}" >"$result" || die "the native runner failed on $label" 4
  (cd "$here" && "$local_py" -m targets.device merge "$out" --runtime "$runtime" ${merge_backend[@]+"${merge_backend[@]}"} --label "$label" --result "$result")
  echo "validate_android: merged into $out/report.md" >&2
  exit 0
fi

cmd=("$python" "$remote_dir/runner.py" --runtime "$backend" --artifact "$remote_dir/$artifact"
  --inputs "$remote_dir/${backend}_inputs.npy" --logits-out "$remote_dir/generation.npz"
  --threads "$threads" --chunk "$chunk" --new-tokens "$new_tokens" --fill "$fill" ${load_flags[@]+"${load_flags[@]}"})
if [ "$dry" = 1 ]; then
  shell "${cmd[@]}"
  run "${adb[@]}" pull "$remote_dir/generation.npz" "$generation"
  show "$local_py" -m targets.device merge "$out" --runtime "$runtime" ${merge_backend[@]+"${merge_backend[@]}"} --label "$label" --result "$result" \
    --generation "$generation"
  exit 0
fi
shell "${cmd[@]}" >"$result" || die "the runner failed on $label; its output is in $result (is $python there, with numpy and $runtime?)" 4
grep -q '"error": "runtime_missing"' "$result" && die "the runtime is missing on $label: install $backend for $python" 8
"${adb[@]}" pull "$remote_dir/generation.npz" "$generation" >&2 || die "adb pull of the results failed" 4
(cd "$here" && "$local_py" -m targets.device merge "$out" --runtime "$runtime" ${merge_backend[@]+"${merge_backend[@]}"} --label "$label" \
  --result "$result" --generation "$generation")
echo "validate_android: merged into $out/report.md" >&2
