#!/bin/bash
# HEAD c0540be (old) / immediate writes (new1) / + the lazy silence timer (new2): the mux only, turns rotating
cd /tmp
for busy in 200 0; do
for k in 1 2; do
  trees="old new1 new2"; [ $k = 2 ] && trees="new2 new1 old"
  for tree in $trees; do
    echo "== busy=$busy run=$k tree=$tree"
    (cd /tmp/hop-$tree && PYTHONPATH= timeout 900 /work/main/.venv/bin/python bench/hop.py --via mux --rounds 2 --requests 800 --concurrency 1,16,64,256 --busy-us $busy 2>&1 | grep -v '^{' | tail -4)
  done
done
done
