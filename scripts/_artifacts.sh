# Sourced by validate_ssh.sh and validate_android.sh: pick the artifact for $runtime in $out, check
# that the run's files are there, and read threads / prefill chunk / decode tokens / positions to fill
# from its profile. Needs: die, $runtime, $out, $local_py.
# Sets: files, artifact, model_ref, backend, merge_backend, inputs, threads, chunk, new_tokens, fill,
# load_flags.
#   artifact:  the file runner.py is given (a GenAI folder's model.onnx: it loads the folder around it)
#   model_ref: what a native runner is given ({model}): the file, or the GenAI folder apps load
#   backend:   runner.py's --runtime (onnxruntime-genai for a GenAI folder: the Generator, as locally)
load_artifacts() {  # $1: the target named in the "run make export" hint
  case "$runtime" in
    onnxruntime)  # the ORT-format file (onnx_format: ort), the GenAI folder (onnx_format: genai), or the .onnx
      if [ -f "$out/model.ort" ]; then files=("$out/model.ort"); artifact=model.ort
      elif [ -f "$out/genai/genai_config.json" ]; then files=("$out/genai"); artifact=genai/model.onnx; backend=onnxruntime-genai
      else files=("$out/model.onnx" "$out/model.onnx.data"); artifact=model.onnx; fi ;;
    executorch) files=("$out/model.pte"); artifact=model.pte ;;
    *) die "--runtime must be onnxruntime or executorch, not '$runtime'" ;;
  esac
  backend=${backend:-$runtime}
  model_ref=$artifact merge_backend=()
  if [ "$backend" = onnxruntime-genai ]; then model_ref=genai merge_backend=(--backend "$backend"); fi
  for f in "${files[@]}" "$out/profile.yaml" "$out/report.json"; do
    [ -e "$f" ] || die "$f is missing: run \`make export TARGET=$1\` first (ARTIFACTS_DIR is its output directory)"
  done
  inputs="$out/validation/${backend}_inputs.npy"
  [ -f "$inputs" ] || die "$inputs is missing: run \`make validate\` for $out first"
  [ -x "$local_py" ] || die "local Python $local_py not found: run \`make setup\` (or set PRUNEFIT_PYTHON)"
  # threads, prefill chunk, decode tokens and the context to fill (the worst case the profile claims,
  # up to fill_max_positions as the local validation does) come from the profile the artifacts were made for
  # and how the app loads a .pte (executorch_load_mode: mmap -> the runner's --no-mlock)
  read -r threads chunk new_tokens fill load_mode < <("$local_py" - "$out/profile.yaml" <<'PY'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
print(p["threads"], p["prefill_tokens"], p.get("decode_tokens", 32),
      min(p["context_length"], p.get("fill_max_positions", 8192)), p.get("executorch_load_mode", "file"))
PY
  )
  load_flags=()
  if [ "$backend" = executorch ] && [ "$load_mode" = mmap ]; then load_flags=(--no-mlock); fi
}
