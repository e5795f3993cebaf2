#!/bin/bash
# gateway CPU per streamed request, three trees in turn: HTTP on the socket (8180e9d), the one connection (c0540be), HEAD
for k in 1 2 3; do
  trees="http old head"; [ $k = 2 ] && trees="head old http"
  for tree in $trees; do
    dir=/work/main; [ $tree = http ] && dir=/tmp/tree-http; [ $tree = old ] && dir=/tmp/hop-old
    echo "== pass=$k tree=$tree"
    (cd $dir && PYTHONPATH= timeout 300 /work/main/.venv/bin/python bench/inprocess.py --stream --requests 3000 2>&1 | tail -2)
  done
done
