// Command snapshotter-bench times Prepare -> Mounts -> Commit through a containerd
// daemon's snapshots API, for one snapshotter, and prints the result as JSON.
//
// It speaks to containerd with containerd's own Go client (containerd.New +
// Client.SnapshotService(name)), so every call takes the path a real client's does:
// containerd's metadata layer (a bbolt transaction per change, plus the lease
// reference), then either the native snapshotter in the daemon or, for a proxy
// plugin, a gRPC call to the plugin's socket.
//
// Each of -n iterations i runs, one call after the other:
//
//	Prepare("bench-active-<i>", parent) -> Mounts("bench-active-<i>") -> Commit("bench-layer-<i>", "bench-active-<i>")
//
// In -mode flat the parent is always "". In -mode chain it is the previous
// iteration's committed snapshot, like the layers of an image, so that snapshot i
// sits i layers deep; -chain-depth D > 0 starts a new chain every D iterations.
// -warmup iterations run first, untimed, in a chain of their own.
//
// All work happens in a fresh namespace (-namespace, default bench-<pid>-<ns>)
// under one lease, so that containerd's garbage collector, which runs between
// calls whenever enough mutations have piled up, never takes a snapshot away
// mid-run. Afterwards, untimed, it removes every snapshot it made, children
// first, deletes the lease with a synchronous garbage collection (which waits
// until the snapshotter itself has dropped the removed snapshots), and deletes
// the namespace. So the next run starts from an empty snapshotter.
//
// Build offline in GOPATH mode against Debian's containerd 1.6 sources:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS= GOENV=off \
//	  GOCACHE=$TMP/gocache CGO_ENABLED=0 go build -o $TMP/snapshotter-bench .
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
)

// OpStats summarizes the latencies of one kind of call, in milliseconds.
type OpStats struct {
	Count  int     `json:"count"`
	TotalS float64 `json:"total_s"`
	MeanMs float64 `json:"mean_ms"`
	MinMs  float64 `json:"min_ms"`
	P50Ms  float64 `json:"p50_ms"`
	P90Ms  float64 `json:"p90_ms"`
	P99Ms  float64 `json:"p99_ms"`
	MaxMs  float64 `json:"max_ms"`
}

// Result is what the program prints on stdout.
type Result struct {
	Snapshotter string  `json:"snapshotter"`
	Mode        string  `json:"mode"`
	ChainDepth  int     `json:"chain_depth"` // 0: one chain of all iterations (chain mode)
	Iterations  int     `json:"iterations"`
	Warmup      int     `json:"warmup"`
	Namespace   string  `json:"namespace"`
	Address     string  `json:"address"`
	TotalS      float64 `json:"total_s"`
	IterPerS    float64 `json:"iterations_per_s"`
	CallsPerS   float64 `json:"calls_per_s"`
	// Ops holds prepare, mounts, commit and iteration (the three calls together).
	Ops map[string]OpStats `json:"ops"`
	// Median iteration latency over the first and last tenth of the iterations:
	// in chain mode, how the cost grows with the depth of the chain.
	IterP50MsFirstTenth float64 `json:"iteration_p50_ms_first_tenth"`
	IterP50MsLastTenth  float64 `json:"iteration_p50_ms_last_tenth"`
	// What the last Mounts call returned, as a sanity check of the mode.
	LastMountType         string `json:"last_mount_type"`
	LastMountOptionsBytes int    `json:"last_mount_options_bytes"`
	// CPU seconds spent during the timed loop (not warm-up, not cleanup): "client"
	// is this program, the others are the processes named with -cpu-pid.
	CPUSeconds map[string]float64 `json:"cpu_s"`
	CleanupS   float64            `json:"cleanup_s"`
	Removed    int                `json:"removed"`
}

type options struct {
	address, name, mode, namespace string
	n, warmup, chainDepth          int
	timeout                        time.Duration
	cpuPids                        pidFlag
}

// pidFlag collects -cpu-pid NAME=PID.
type pidFlag map[string]int

func (p pidFlag) String() string { return fmt.Sprint(map[string]int(p)) }

func (p pidFlag) Set(value string) error {
	name, pid, ok := strings.Cut(value, "=")
	n, err := strconv.Atoi(pid)
	if !ok || name == "" || err != nil || n <= 0 {
		return fmt.Errorf("want NAME=PID, got %q", value)
	}
	p[name] = n
	return nil
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's utime and stime: 100 on Linux.
const clockTicks = 100

// processCPU is the user+system CPU time of a whole process (all its threads).
func processCPU(pid int) (float64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid ...: comm may hold spaces; utime and stime are the
	// 14th and 15th fields, the 12th and 13th after the closing parenthesis.
	text := string(data)
	fields := strings.Fields(text[strings.LastIndexByte(text, ')')+1:])
	if len(fields) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	utime, err1 := strconv.ParseUint(fields[11], 10, 64)
	stime, err2 := strconv.ParseUint(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime", pid)
	}
	return float64(utime+stime) / clockTicks, nil
}

func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// cpuTimes reads the CPU time of this program and of every -cpu-pid process.
func cpuTimes(pids pidFlag) (map[string]float64, error) {
	times := map[string]float64{"client": selfCPU()}
	for name, pid := range pids {
		t, err := processCPU(pid)
		if err != nil {
			return nil, fmt.Errorf("cpu time of %s: %w", name, err)
		}
		times[name] = t
	}
	return times, nil
}

func parseFlags() options {
	var o options
	flag.StringVar(&o.address, "address", "", "containerd's gRPC socket (required)")
	flag.StringVar(&o.name, "snapshotter", "", "snapshotter name, e.g. overlayfs or a proxy plugin's name (required)")
	flag.StringVar(&o.mode, "mode", "chain", "chain: each parent is the previous committed snapshot; flat: no parents")
	flag.IntVar(&o.n, "n", 1000, "timed iterations of Prepare -> Mounts -> Commit")
	flag.IntVar(&o.warmup, "warmup", 10, "untimed iterations first (their own chain in chain mode)")
	flag.IntVar(&o.chainDepth, "chain-depth", 0, "chain mode: start a new chain every D iterations (0: one chain)")
	flag.StringVar(&o.namespace, "namespace", "", "containerd namespace to work in; a fresh one (default: bench-<pid>-<ns>)")
	o.cpuPids = pidFlag{}
	flag.Var(o.cpuPids, "cpu-pid", "NAME=PID: report the CPU time this process spends in the timed loop (repeatable)")
	flag.DurationVar(&o.timeout, "call-timeout", 2*time.Minute, "deadline of each call")
	flag.Parse()
	if o.address == "" || o.name == "" {
		fail(errors.New("-address and -snapshotter are required"))
	}
	if o.mode != "chain" && o.mode != "flat" {
		fail(fmt.Errorf("-mode must be chain or flat, not %q", o.mode))
	}
	if o.n < 1 || o.warmup < 0 || o.chainDepth < 0 {
		fail(errors.New("-n must be positive, -warmup and -chain-depth not negative"))
	}
	if o.namespace == "" {
		o.namespace = fmt.Sprintf("bench-%d-%d", os.Getpid(), time.Now().UnixNano())
	}
	return o
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "snapshotter-bench: %v\n", err)
	os.Exit(1)
}

// made records what exists, in creation order, so cleanup can go children first.
type made struct {
	keys []string
}

func (m *made) add(key string) { m.keys = append(m.keys, key) }
func (m *made) rename(old, new string) {
	for i, k := range m.keys {
		if k == old {
			m.keys[i] = new
			return
		}
	}
}

type durations struct {
	prepare, mounts, commit, iteration []time.Duration
}

func call(parent context.Context, timeout time.Duration, f func(context.Context) error) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	start := time.Now()
	err := f(ctx)
	return time.Since(start), err
}

// iteration runs Prepare -> Mounts -> Commit once and returns the mounts.
func iteration(ctx context.Context, o options, sn snapshots.Snapshotter, m *made, d *durations,
	active, name, parent string) ([]mount.Mount, error) {
	start := time.Now()
	took, err := call(ctx, o.timeout, func(ctx context.Context) error {
		_, err := sn.Prepare(ctx, active, parent)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("prepare %s (parent %q): %w", active, parent, err)
	}
	m.add(active)
	var mounts []mount.Mount
	tookMounts, err := call(ctx, o.timeout, func(ctx context.Context) error {
		var err error
		mounts, err = sn.Mounts(ctx, active)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("mounts %s: %w", active, err)
	}
	if len(mounts) == 0 {
		return nil, fmt.Errorf("mounts %s: no mounts returned", active)
	}
	tookCommit, err := call(ctx, o.timeout, func(ctx context.Context) error {
		return sn.Commit(ctx, name, active)
	})
	if err != nil {
		return nil, fmt.Errorf("commit %s as %s: %w", active, name, err)
	}
	m.rename(active, name)
	if d != nil {
		d.prepare = append(d.prepare, took)
		d.mounts = append(d.mounts, tookMounts)
		d.commit = append(d.commit, tookCommit)
		d.iteration = append(d.iteration, time.Since(start))
	}
	return mounts, nil
}

// joinErrors is errors.Join for Go 1.19: nil when all are nil, else one error
// whose message lists them all (the first one stays unwrappable).
func joinErrors(errs ...error) error {
	var kept []error
	for _, err := range errs {
		if err != nil {
			kept = append(kept, err)
		}
	}
	if len(kept) == 0 {
		return nil
	}
	err := kept[0]
	for _, more := range kept[1:] {
		err = fmt.Errorf("%w; %v", err, more)
	}
	return err
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// percentile by nearest rank over sorted values.
func percentile(sorted []time.Duration, p float64) time.Duration {
	rank := int(math.Ceil(p*float64(len(sorted)))) - 1
	if rank < 0 {
		rank = 0
	}
	return sorted[rank]
}

func summarize(values []time.Duration) OpStats {
	sorted := append([]time.Duration(nil), values...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	var total time.Duration
	for _, v := range sorted {
		total += v
	}
	return OpStats{
		Count:  len(sorted),
		TotalS: total.Seconds(),
		MeanMs: ms(total) / float64(len(sorted)),
		MinMs:  ms(sorted[0]),
		P50Ms:  ms(percentile(sorted, 0.50)),
		P90Ms:  ms(percentile(sorted, 0.90)),
		P99Ms:  ms(percentile(sorted, 0.99)),
		MaxMs:  ms(sorted[len(sorted)-1]),
	}
}

func median(values []time.Duration) float64 {
	if len(values) == 0 {
		return 0
	}
	return summarize(values).P50Ms
}

// cleanup removes the snapshots children first, deletes the lease synchronously
// (a garbage collection that also clears the snapshotter) and the namespace.
func cleanup(ctx context.Context, client *containerd.Client, sn snapshots.Snapshotter, m *made,
	lease leases.Lease, namespace string) (int, error) {
	var errs []error
	removed := 0
	for i := len(m.keys) - 1; i >= 0; i-- {
		if err := sn.Remove(ctx, m.keys[i]); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", m.keys[i], err))
			continue
		}
		removed++
	}
	if err := client.LeasesService().Delete(ctx, lease, leases.SynchronousDelete); err != nil {
		errs = append(errs, fmt.Errorf("delete lease %s: %w", lease.ID, err))
	}
	plain := namespaces.WithNamespace(context.Background(), namespace)
	if err := client.NamespaceService().Delete(plain, namespace); err != nil {
		errs = append(errs, fmt.Errorf("delete namespace %s: %w", namespace, err))
	}
	return removed, joinErrors(errs...)
}

func run(o options) (*Result, error) {
	client, err := containerd.New(o.address, containerd.WithDefaultNamespace(o.namespace),
		containerd.WithTimeout(30*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", o.address, err)
	}
	defer client.Close()

	base := namespaces.WithNamespace(context.Background(), o.namespace)
	lease, err := client.LeasesService().Create(base, leases.WithRandomID(),
		leases.WithExpiration(24*time.Hour))
	if err != nil {
		return nil, fmt.Errorf("create lease: %w", err)
	}
	ctx := leases.WithLease(base, lease.ID)
	sn := client.SnapshotService(o.name)
	m := &made{}

	result, runErr := measure(ctx, o, sn, m)

	cleanupCtx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	started := time.Now()
	removed, cleanErr := cleanup(cleanupCtx, client, sn, m, lease, o.namespace)
	if runErr != nil {
		return nil, joinErrors(runErr, cleanErr)
	}
	if cleanErr != nil {
		return nil, fmt.Errorf("cleanup: %w", cleanErr)
	}
	result.CleanupS = time.Since(started).Seconds()
	result.Removed = removed
	return result, nil
}

func measure(ctx context.Context, o options, sn snapshots.Snapshotter, m *made) (*Result, error) {
	parent := ""
	for i := 0; i < o.warmup; i++ {
		name := fmt.Sprintf("warmup-layer-%d", i)
		if _, err := iteration(ctx, o, sn, m, nil, fmt.Sprintf("warmup-active-%d", i), name, parent); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
		if o.mode == "chain" {
			parent = name
		}
	}

	d := &durations{}
	var last []mount.Mount
	parent = ""
	cpuBefore, err := cpuTimes(o.cpuPids)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	for i := 0; i < o.n; i++ {
		if o.mode == "chain" && o.chainDepth > 0 && i%o.chainDepth == 0 {
			parent = ""
		}
		name := fmt.Sprintf("bench-layer-%d", i)
		mounts, err := iteration(ctx, o, sn, m, d, fmt.Sprintf("bench-active-%d", i), name, parent)
		if err != nil {
			return nil, fmt.Errorf("iteration %d: %w", i, err)
		}
		last = mounts
		if o.mode == "chain" {
			parent = name
		}
	}
	total := time.Since(start)
	cpu, err := cpuTimes(o.cpuPids)
	if err != nil {
		return nil, err
	}
	for name := range cpu {
		cpu[name] -= cpuBefore[name]
	}

	tenth := o.n / 10
	if tenth < 1 {
		tenth = 1
	}
	optionBytes := 0
	for _, opt := range last[0].Options {
		optionBytes += len(opt) + 1
	}
	return &Result{
		Snapshotter: o.name,
		Mode:        o.mode,
		ChainDepth:  o.chainDepth,
		Iterations:  o.n,
		Warmup:      o.warmup,
		Namespace:   o.namespace,
		Address:     o.address,
		TotalS:      total.Seconds(),
		IterPerS:    float64(o.n) / total.Seconds(),
		CallsPerS:   float64(3*o.n) / total.Seconds(),
		Ops: map[string]OpStats{
			"prepare":   summarize(d.prepare),
			"mounts":    summarize(d.mounts),
			"commit":    summarize(d.commit),
			"iteration": summarize(d.iteration),
		},
		IterP50MsFirstTenth:   median(d.iteration[:tenth]),
		IterP50MsLastTenth:    median(d.iteration[len(d.iteration)-tenth:]),
		LastMountType:         last[0].Type,
		LastMountOptionsBytes: optionBytes,
		CPUSeconds:            cpu,
	}, nil
}

func main() {
	o := parseFlags()
	result, err := run(o)
	if err != nil {
		fail(err)
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(result); err != nil {
		fail(err)
	}
}
