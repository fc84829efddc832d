#!/usr/bin/env bash
# Environments of the peer decoders that benchmarks/decode_peers.py compares with the project's PyAV path.
# Never needed to train or to run the tests. Idempotent: run it again to repair or update. Exits 1 when
# a peer failed to install or load (the others are still usable).
#
#   bash benchmarks/peers/setup.sh            # all peers
#   bash benchmarks/peers/setup.sh decord2    # some of them: decord decord2 spdl torchcodec
#
# Each peer gets a venv under benchmarks/peers/.envs/<peer>/ with numpy and the peer:
#   decord      decord==0.6.0 (the last release of the original project)
#   decord2     decord2, latest (installs the same module `decord`, hence its own venv)
#   spdl        spdl-io (spdl.io.sample_decode_video)
#   torchcodec  torchcodec --no-deps; torch comes from the project's .venv through a .pth file (no second
#               5 GB copy of torch; a venv's --system-site-packages would reach the base interpreter's
#               packages, not the project venv's)
# SPDL and torchcodec load FFmpeg's shared libraries at run time. PyAV's wheel (in the project .venv)
# carries FFmpeg under site-packages/av.libs/ with hashed file names; .envs/<peer>/ffmpeg/ gets symlinks
# named by soname (libavcodec.so.62 -> av.libs/libavcodec-<hash>.so.62...), and .envs/<peer>/ld_library_path
# records the LD_LIBRARY_PATH that decode_peers.py sets when it runs the peer. FFMPEG_LIBS=/some/dir
# uses another FFmpeg instead (e.g. Debian's FFmpeg 5.1: apt-get install libavcodec59 libavformat59
# libavfilter8 libavdevice59 libswscale6 libswresample4 libavutil57, then FFMPEG_LIBS=/usr/lib/x86_64-linux-gnu).
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
ENVS=$ROOT/benchmarks/peers/.envs
MAIN=$ROOT/.venv
RUNNER=$ROOT/benchmarks/peers/runner.py
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(decord decord2 spdl torchcodec)

if [ ! -x "$MAIN/bin/python" ]; then
    echo "error: $MAIN/bin/python missing: run 'make venv' first (the peers reuse its interpreter and PyAV)" >&2
    exit 2
fi
mkdir -p "$ENVS"
MAIN_SITE=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
AV_LIBS=$MAIN_SITE/av.libs
CHECK_VIDEO=$ENVS/check.mp4     # a short H.264 clip every peer must decode to count as loaded
if [ ! -s "$CHECK_VIDEO" ]; then
    "$MAIN/bin/python" - "$CHECK_VIDEO" <<'PY'
import os, sys, av, numpy as np
tmp = sys.argv[1] + ".part.mp4"
with av.open(tmp, "w") as out:
    st = out.add_stream("libx264", rate=25)
    st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
    for i in range(8):
        f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")
        f.pts = i
        for p in st.encode(f):
            out.mux(p)
    for p in st.encode():
        out.mux(p)
os.replace(tmp, sys.argv[1])
PY
fi

ffmpeg_links() {   # $1 = env dir: symlinks named by soname to PyAV's FFmpeg, echoes the LD_LIBRARY_PATH
    local dir=$1/ffmpeg
    if [ -n "${FFMPEG_LIBS:-}" ]; then echo "$FFMPEG_LIBS"; return; fi
    rm -rf "$dir"; mkdir -p "$dir"
    "$MAIN/bin/python" - "$AV_LIBS" "$dir" <<'EOF'
import os, re, sys
src, dst = sys.argv[1:3]
for f in sorted(os.listdir(src)):
    # auditwheel's names: libavcodec-5e6b81c2.so.62.28.102 -> soname libavcodec.so.62
    m = re.match(r"^(lib(?:av\w+|sw\w+|postproc))-[0-9a-f]{8}\.so\.(\d+)", f)
    if m:
        os.symlink(os.path.join(src, f), os.path.join(dst, f"{m.group(1)}.so.{m.group(2)}"))
EOF
    echo "$dir:$AV_LIBS"
}

make_env() {       # $1 = peer, rest = pip arguments
    local peer=$1; shift
    local env=$ENVS/$peer
    if [ ! -x "$env/bin/python" ]; then
        "$MAIN/bin/python" -m venv "$env" || return 1
    fi
    "$env/bin/pip" install -q "$@" || return 1
}

declare -A STATUS
for peer in "${PEERS[@]}"; do
    echo "== $peer"
    env=$ENVS/$peer
    ok=1
    case $peer in
        decord)  make_env decord numpy "decord==0.6.0" || ok=0 ;;
        decord2) make_env decord2 numpy decord2 || ok=0 ;;
        spdl)    make_env spdl numpy spdl-io || ok=0 ;;
        torchcodec)
            if [ ! -x "$env/bin/python" ]; then "$MAIN/bin/python" -m venv "$env" || ok=0; fi
            if [ $ok = 1 ]; then
                site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
                echo "$MAIN_SITE" > "$site/project_venv.pth"     # torch and numpy from the project .venv
                "$env/bin/pip" install -q --no-deps torchcodec || ok=0
            fi ;;
        *) echo "unknown peer $peer (choose from: decord decord2 spdl torchcodec)" >&2; ok=0 ;;
    esac
    if [ $ok = 1 ]; then
        lib=""
        case $peer in spdl|torchcodec) lib=$(ffmpeg_links "$env") ;; esac
        echo "$lib" > "$env/ld_library_path"
        ld=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        if out=$(LD_LIBRARY_PATH="$ld" "$env/bin/python" "$RUNNER" --check "$peer" "$CHECK_VIDEO" 2>&1); then
            STATUS[$peer]="loaded: $(echo "$out" | tail -n 1)"
        else
            STATUS[$peer]="FAILED to load: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
        fi
    else
        STATUS[$peer]="FAILED to install"
    fi
    echo "${STATUS[$peer]}"
done
echo
echo "peer environments in $ENVS ($(du -sh "$ENVS" 2>/dev/null | cut -f1)):"
failed=0
for peer in "${PEERS[@]}"; do
    printf '  %-11s %s\n' "$peer" "${STATUS[$peer]}"
    case ${STATUS[$peer]} in loaded:*) ;; *) failed=1 ;; esac
done
exit $failed     # 1 when a peer failed: decode_peers.py still runs and reports it
