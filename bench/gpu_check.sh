#!/usr/bin/env bash
# GPU readiness check: one command on a machine with an NVIDIA GPU, about 3 minutes (capped near 5):
#   1. the environment: GPUs, torch and its CUDA, CPU, memory, C compiler, the Python modules the tests import;
#      without a CUDA GPU it stops here (exit 2) and says so;
#   2. the C kernels built in place (cffi; no network, no dependency resolution), their ISA;
#   3. the device-exercising tests on CUDA (HK2_TEST_DEVICE=cuda, tests/conftest.py), every test run (no -x):
#      the files below plus any other test file with a test or fixture taking `device` (HK2_GPU_TESTS overrides);
#   4. bench/bench_hybrid.py on a K2-shaped model (random Q4_0 experts): cache off / on / on + prefetch,
#      overlap on / off, prefill streaming off / on / auto; its table is printed last.
# Full logs go to $OUT when it is set (else /tmp/hk2_gpu_check): gpu_check.log (everything printed), build.log,
# pytest.log, junit.xml, bench.log, bench.json. Exit: 0 all passed, 1 a test or a bench row failed, 2 no GPU or
# an environment that cannot run it.
#
#   bash bench/gpu_check.sh
#   HK2_GPU_CHECK_REHEARSAL=1 bash bench/gpu_check.sh   # the same steps on a CPU-only machine (tests on cpu,
#                                                       # a small bench): checks this script, not the GPU
# Budgets (seconds, env): HK2_TESTS_BUDGET (170), HK2_TEST_TIMEOUT per test (120, with pytest-timeout),
# HK2_BENCH_BUDGET (120). Wheels for modules the machine lacks (cffi, pycparser, gguf) may sit in .whl/.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
LOG=${OUT:-/tmp/hk2_gpu_check}
mkdir -p "$LOG" || exit 2
PY=${PYTHON:-python3}
REHEARSAL=${HK2_GPU_CHECK_REHEARSAL:-0}
export PYTHONUNBUFFERED=1
TESTS=(tests/test_hybrid.py tests/test_prefill_stream.py tests/test_model_parity.py tests/test_deferral.py
       tests/test_cache_sim.py tests/test_prefetch_fit.py tests/test_decode_step.py tests/test_cpu_backend.py)
for f in $(grep -lE '^def [A-Za-z0-9_]+\(.*\bdevice\b' tests/test_*.py 2>/dev/null); do
  case " ${TESTS[*]} " in *" $f "*) ;; *) TESTS+=("$f") ;; esac
done
if [ -n "${HK2_GPU_TESTS:-}" ]; then read -r -a TESTS <<<"$HK2_GPU_TESTS"; fi

section() { printf '\n===== %s (%s, +%ss) =====\n' "$1" "$(date +%H:%M:%S)" "$SECONDS"; }

main() {
  section "environment"
  if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      echo "wheels from .whl/ installed to /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
      echo "WARNING: installing .whl/*.whl failed; going on with what is installed"
    fi
  fi
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # this checkout's hybrid_k2, built in place
  echo "repo $ROOT at $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed file(s); logs in $LOG"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,pcie.link.gen.current,pcie.link.width.current \
      --format=csv,noheader 2>/dev/null
  else
    echo "nvidia-smi: not on PATH"
  fi
  echo "CPU: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1); RAM: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB, " $7 " GiB available"}')"
  local cc=${CC:-cc} have_cc=1
  if command -v "$cc" >/dev/null; then
    echo "C compiler: $("$cc" --version 2>&1 | head -1)"
  else
    echo "C compiler: NONE ('$cc' not on PATH): the kernels cannot be built here"
    have_cc=0
  fi
  "$PY" bench/gpu_check.py env
  local env_rc=$?
  if [ "$env_rc" -ne 0 ] && [ "$REHEARSAL" != 1 ]; then
    echo
    echo "NO GPU: torch sees no CUDA device here (see above), so there is nothing for this check to run."
    echo "Run bash bench/gpu_check.sh on the GPU machine (HK2_GPU_CHECK_REHEARSAL=1 rehearses it on a CPU)."
    return 2
  fi
  local dev=cuda
  if [ "$env_rc" -ne 0 ]; then
    dev=cpu
    echo "REHEARSAL: no GPU; the tests run on the CPU and the bench uses small shapes"
  fi

  section "build the C kernels in place"
  local built=0
  if [ "$have_cc" = 1 ]; then
    if "$PY" hybrid_k2/_kernels_build.py >"$LOG/build.log" 2>&1; then
      built=1
    else
      echo "cffi build failed (tail of build.log below); trying setup.py build_ext --inplace"
      tail -n 15 "$LOG/build.log"
      "$PY" setup.py build_ext --inplace >>"$LOG/build.log" 2>&1 && built=1
    fi
  fi
  [ "$built" = 1 ] && echo "built: $(ls hybrid_k2/_kernels*.so 2>/dev/null | tr '\n' ' ')($SECONDS s so far)"
  if ! "$PY" bench/gpu_check.py kernels; then
    echo "The kernels do not load, so neither the tests nor the bench can run; build.log's tail:"
    tail -n 30 "$LOG/build.log" 2>/dev/null
    return 2
  fi

  section "device tests on $dev (HK2_TEST_DEVICE=$dev)"
  # -v: each test's name is in pytest.log as it starts (a hang shows where); faulthandler dumps every thread's
  # stack into it when a test runs past 90 s
  local opts=(-v -rfE -p no:cacheprovider --durations=12 -o faulthandler_timeout=90 --junitxml="$LOG/junit.xml")
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    opts+=(--timeout="${HK2_TEST_TIMEOUT:-120}")
  else
    echo "(pytest-timeout absent: no per-test timeout, only the ${HK2_TESTS_BUDGET:-170} s budget)"
  fi
  echo "${TESTS[*]}"
  # (a fixed cuBLAS workspace: repeatable results when several streams run matmuls)
  HK2_TEST_DEVICE=$dev CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8} \
    timeout -k 10 "${HK2_TESTS_BUDGET:-170}" "$PY" -m pytest "${opts[@]}" "${TESTS[@]}" >"$LOG/pytest.log" 2>&1
  local test_rc=$?
  # pytest's closing line ("== 95 passed, 1 failed in 80.1s =="), if it got that far
  local closing
  closing=$(grep -E '^=+ .*(passed|failed|error|skipped).* in [0-9.]+s' "$LOG/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
  if { [ "$test_rc" = 124 ] || [ "$test_rc" = 137 ]; } && [ -n "$closing" ]; then
    echo "(the time budget ran out after pytest's summary, while it shut down: counted by that summary)"
    case $closing in *failed*|*error*) test_rc=1 ;; *) test_rc=0 ;; esac
  fi
  # the slowest tests, the short summary (failures, errors) and the closing line; tracebacks are in pytest.log
  sed -n '/slowest .* durations/,$p' "$LOG/pytest.log" | tail -n 70
  grep -qE "slowest .* durations" "$LOG/pytest.log" || tail -n 25 "$LOG/pytest.log"
  case $test_rc in
    0) TESTS_LINE="device tests on $dev: all passed ($closing)" ;;
    124|137) TESTS_LINE="device tests on $dev: STOPPED at the ${HK2_TESTS_BUDGET:-170} s budget (pytest.log has how far they got)" ;;
    *) TESTS_LINE="device tests on $dev: FAILED, pytest exit $test_rc (${closing:-no summary: see pytest.log})" ;;
  esac
  echo "$TESTS_LINE"

  section "hybrid bench on $dev"
  local bench_args=(--layers 4 --cache-frac 0.1 --tokens 64 --warmup 32 --prefill-tokens 512)
  [ "$dev" = cpu ] && bench_args=(--small --tokens 8 --warmup 4 --prefill-tokens 128)
  echo "bench/bench_hybrid.py ${bench_args[*]}"
  timeout -k 10 "${HK2_BENCH_BUDGET:-120}" "$PY" bench/bench_hybrid.py "${bench_args[@]}" --json "$LOG/bench.json" \
    >"$LOG/bench.log" 2>&1
  local bench_rc=$?
  # its set-up lines and any failed row here; every row is in the table at the end
  sed -n '1,/^cpu backend/p' "$LOG/bench.log" | grep -v '^cpu backend' | tail -n 12
  grep -E ': FAILED \(' "$LOG/bench.log" | head -n 10
  case $bench_rc in
    0) BENCH_LINE="bench: every row ran" ;;
    124|137) BENCH_LINE="bench: STOPPED at the ${HK2_BENCH_BUDGET:-120} s budget" ;;
    *) BENCH_LINE="bench: exit $bench_rc (a row FAILED: its traceback is in bench.log)" ;;
  esac

  section "summary (total $SECONDS s)"
  echo "$TESTS_LINE"
  echo "$BENCH_LINE"
  echo "logs: $LOG/{gpu_check.log,build.log,pytest.log,junit.xml,bench.log,bench.json}"
  echo
  "$PY" bench/gpu_check.py table "$LOG/bench.log"
  if [ "$test_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    return 1
  fi
  return 0
}

main "$@" 2>&1 | tee "$LOG/gpu_check.log"
exit "${PIPESTATUS[0]}"
