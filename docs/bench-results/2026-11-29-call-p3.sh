# p3 (one H200): why imports are slow here (bytecode?), and which preload import initialises CUDA.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
env | grep -i "^PYTHON" | sort
python3 -c "import sys; print(sys.flags.dont_write_bytecode, sys.pycache_prefix)"
T=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ls -ld $T $T/__pycache__ 2>&1 | head; ls $T/__pycache__ 2>/dev/null | head -3; ls $T/_inductor/__pycache__ 2>/dev/null | wc -l; ls $T/_inductor/*.py | wc -l
touch $T/.w 2>&1 && echo writable && rm -f $T/.w
for i in 1 2; do python3 -X importtime -c "import torch, torch._dynamo, torch._inductor.compile_fx" 2> /tmp/imp$i.txt; tail -1 /tmp/imp$i.txt; done
sort -t'|' -k1 -n -r /tmp/imp2.txt | head -12
python3 - <<'P'
import ctypes, importlib, time
cuda = ctypes.CDLL("libcuda.so.1")
def state():
    n = ctypes.c_int(-1); return cuda.cuDeviceGetCount(ctypes.byref(n))
for m in ("torch", "torch._dynamo", "trainer.loop", "triton", "torch._inductor.config", "torch._inductor.utils", "torch._inductor.codecache", "torch._inductor.compile_fx"):
    t = time.time(); importlib.import_module(m); print(m, round(time.time() - t, 2), "cuDeviceGetCount ->", state())
P
