#!/bin/sh
# The in-lab checks, run by lab/dom0/init inside dom0's root (the host's root
# over 9p with a tmpfs overlay; see lab/dom0/init). Argument: the checkout path.
#
# Order (each step's result is one line; later steps are skipped, as FAIL with
# the reason, when what they need did not come up):
#   dom0-devices    /dev/xen/{privcmd,evtchn,gntdev,xenbus}, control_d
#   xenstored       xenstored + xen-init-dom0 + xenconsoled running
#   guest-created   `xl create` of the lab guest, listed by `xl list`
#   guest-running   the guest's workload reported its PFNs on its console
#   then the Python checks of lab/checks/*.py (xenctrl, xenstore, remus), each
#   printing its own result lines, and (step "dom0_pytest") the project's own
#   dom0 test modules (tests/xenbind/test_xenctrl_dom0.py, tests/xenbind/test_xenstore.py),
#   which skip off a dom0: here every test must run and pass.
#
# Result lines: "LAB-RESULT PASS|FAIL name: detail", on the console (the
# runner reads them from the serial log) and in /lab-results/results.txt.
# Every wait here is bounded; the whole script is bounded by the runner's
# QEMU timeout too.
REPO=${1:-/work/main}
RESULTS=/lab-results
OUT=$RESULTS/results.txt
PY=$REPO/.venv/bin/python
GUEST=labguest
GUEST_TYPE=pvh
GUEST_WAIT=${LAB_GUEST_WAIT:-240}
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lab.guest=*) GUEST_TYPE="${arg#lab.guest=}" ;;
        lab.guestwait=*) GUEST_WAIT="${arg#lab.guestwait=}" ;;
        lab.overcommit=1)
            # exploration only: lets a process reserve more virtual memory
            # than dom0 has (see docs/lab.md, "what blocks")
            echo 1 > /proc/sys/vm/overcommit_memory; OVERCOMMIT=1 ;;
        lab.only=*) ONLY=$(echo "${arg#lab.only=}" | tr '+' ',') ;;
    esac
done
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LAB_REPO=$REPO LAB_RESULTS=$RESULTS LAB_GUEST=$GUEST LAB_GUEST_TYPE=$GUEST_TYPE
DOM0_TESTS="tests/xenbind/test_xenctrl_dom0.py tests/xenbind/test_xenstore.py"
export LAB_CONSOLE_LOG=/var/log/xen/console/guest-$GUEST.log
: > "$OUT"

result() {  # result PASS|FAIL name detail...
    st=$1 name=$2; shift 2
    echo "LAB-RESULT $st $name: $*"
    echo "$st $name: $*" >> "$OUT"
}
stage() { echo "LAB-STAGE $*"; }
stage "dom0.sh $(date -u +%H:%M:%S) guest=$GUEST_TYPE${OVERCOMMIT:+ vm.overcommit_memory=1}"

# 1. dom0 devices ----------------------------------------------------------
missing=""
for d in privcmd evtchn gntdev xenbus; do [ -e /dev/xen/$d ] || missing="$missing $d"; done
caps=$(cat /proc/xen/capabilities 2>/dev/null)
if [ -z "$missing" ] && [ "$caps" = control_d ]; then
    result PASS dom0-devices "/dev/xen/{privcmd,evtchn,gntdev,xenbus} present, capabilities=$caps, $(xl info 2>/dev/null | grep -E '^virt_caps' | tr -s ' ')"
else
    result FAIL dom0-devices "missing:$missing capabilities='$caps'"
fi

# 2. xenstored, dom0's xenstore entries, xenconsoled -------------------------
mkdir -p /var/run/xenstored /var/lib/xenstored /var/lib/xen /var/log/xen/console /var/run/xen
xenstored --pid-file=/var/run/xenstored.pid >/var/log/xen/xenstored.out 2>&1
n=0
until xenstore-read /local >/dev/null 2>&1 || [ $n -ge 20 ]; do sleep 0.5; n=$((n+1)); done
xen-init-dom0 >/var/log/xen/xen-init-dom0.log 2>&1
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
name0=$(xenstore-read /local/domain/0/name 2>/dev/null)
if [ "$name0" = Domain-0 ] && [ -s /var/run/xenconsoled.pid ]; then
    result PASS xenstored "xenstored up, /local/domain/0/name=$name0, xenconsoled logging guest consoles"
    XS_OK=1
else
    result FAIL xenstored "name0='$name0': $(tail -3 /var/log/xen/xenstored.out /var/log/xen/xen-init-dom0.log 2>&1 | tr '\n' ' ')"
fi

# 3. the guest ---------------------------------------------------------------
cat > /tmp/$GUEST.cfg <<CFG
name = "$GUEST"
type = "$GUEST_TYPE"
kernel = "$REPO/lab/cache/vmlinuz"
ramdisk = "$REPO/lab/cache/guest-initrd.gz"
extra = "console=hvc0 quiet"
memory = 128
vcpus = 1
on_crash = "preserve"
# Under QEMU's TCG, SVM gives Xen no next-RIP, so Xen cannot emulate an
# intercepted RDTSCP ("SVM Insn len emulation failed") and the guest dies:
# keep the TSC native and hide RDTSCP.
tsc_mode = "native"
cpuid = "host,rdtscp=0"
CFG
if [ -n "$XS_OK" ] && timeout 120 xl create /tmp/$GUEST.cfg >/tmp/xl-create.log 2>&1 \
        && xl list "$GUEST" >/tmp/xl-list.log 2>&1; then
    result PASS guest-created "xl create ($GUEST_TYPE, 128 MiB): $(tail -1 /tmp/xl-list.log | tr -s ' ')"
    GUEST_OK=1
else
    result FAIL guest-created "$(tail -5 /tmp/xl-create.log 2>/dev/null | tr '\n' ' ')"
fi

# 4. the guest's workload is up: wait for its PFN report on its console -------
if [ -n "$GUEST_OK" ]; then
    t0=$(date +%s); n=0
    until grep -q "LABGUEST READY" "$LAB_CONSOLE_LOG" 2>/dev/null || [ $n -ge "$GUEST_WAIT" ]; do
        sleep 2; n=$((n+2))
        # a crashed or vanished guest will not get READY: stop waiting
        xl list "$GUEST" 2>/dev/null | tail -1 | awk '{print $5}' | grep -q c && break
        xl list "$GUEST" >/dev/null 2>&1 || break
    done
    if grep -q "LABGUEST READY" "$LAB_CONSOLE_LOG" 2>/dev/null; then
        result PASS guest-running "labguest reported its pattern/counter PFNs $(( $(date +%s) - t0 ))s after xl create returned"
        RUN_OK=1
    else
        result FAIL guest-running "no LABGUEST READY on the guest console within ${GUEST_WAIT}s; $(xl list 2>&1 | tail -1 | tr -s ' '); console tail: $(tail -c 400 "$LAB_CONSOLE_LOG" 2>/dev/null | tr '\n' ' ')"
    fi
    cp "$LAB_CONSOLE_LOG" "$RESULTS/guest-console.log" 2>/dev/null
fi

# 5. the Python checks, in this order: the suspend step suspends the guest
#    and resumes it cancelled, before the failover check (after which the
#    killed primary is not fit for it, docs/lab.md); the lifecycle step
#    destroys the guest, so it comes last; "module:part" passes part as
#    the module's argument. lab.only=<comma list> runs only matching steps.
[ -n "$GUEST_OK" ] && export LAB_GUEST_DOMID=$(xl domid "$GUEST" 2>/dev/null)
STEPS="xenctrl_checks dom0_pytest remus_checks:file xenstore_checks:names xenstore_checks:suspend remus_checks:failover xenstore_checks:lifecycle"
for step in $STEPS; do
    mod=${step%%:*} part=""
    [ "$mod" != "$step" ] && part=${step#*:}
    case ",$ONLY," in ",,"|*",$mod,"*|*",$step,"*) ;; *) continue ;; esac
    if [ -z "$RUN_OK" ]; then
        result FAIL "$step" "skipped: the lab guest is not running"
        continue
    fi
    if [ "$mod" = dom0_pytest ]; then
        stage "pytest $DOM0_TESTS"
        plog="$RESULTS/dom0-pytest.log"
        (cd "$REPO" && REMUS_XEN_GUEST=$GUEST PYTHONFAULTHANDLER=1 timeout 600 \
            "$PY" -m pytest -q -rs -p no:cacheprovider $DOM0_TESTS) >"$plog" 2>&1
        rc=$?
        summary=$(grep -E '(passed|failed|error|skipped)' "$plog" | tail -1 | tr -s '=' | sed 's/^ *= *//; s/ *=* *$//')
        skipped=$(grep -c '^SKIPPED' "$plog")
        if [ $rc -eq 0 ] && [ "$skipped" -eq 0 ]; then
            result PASS dom0_pytest "$summary ($DOM0_TESTS)"
        else
            result FAIL dom0_pytest "rc=$rc, $skipped skipped: $summary; $(grep -E '^(FAILED|ERROR|SKIPPED)' "$plog" | head -3 | tr '\n' ' ')"
        fi
        continue
    fi
    stage "python -m lab.checks.$mod $part"
    log="$RESULTS/$mod${part:+-$part}.stderr"
    (cd "$REPO" && PYTHONFAULTHANDLER=1 timeout 900 "$PY" -m "lab.checks.$mod" $part) 2>"$log"
    rc=$?
    [ $rc -eq 0 ] || tail -20 "$log"
    case $rc in
        0|1) ;;
        124|137) result FAIL "$step" "killed after 900s" ;;
        *) result FAIL "$step" "exited with $rc$([ $rc -gt 128 ] && echo " (signal $((rc-128)))"): $(tail -3 "$log" | tr '\n' ' ')" ;;
    esac
done
xl list > "$RESULTS/xl-list.txt" 2>&1
cp "$LAB_CONSOLE_LOG" "$RESULTS/guest-console.log" 2>/dev/null
xl dmesg > "$RESULTS/xl-dmesg.txt" 2>&1
stage "dom0.sh done $(date -u +%H:%M:%S)"
