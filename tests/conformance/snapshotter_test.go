// Package conformance runs containerd 1.6's own snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite) against:
//
//   - TestConformance/overlayfs: containerd's native overlay snapshotter, in process,
//     the baseline that proves the harness and the machine (root, overlayfs);
//   - TestConformance/lazypull: lazypull's snapshotter service, one fresh process per
//     suite case, reached through containerd's own proxy client
//     (snapshots/proxy over containerd.services.snapshots.v1.Snapshots on a unix socket),
//     exactly as containerd talks to a proxy plugin.
//
// The service command comes from LAZYPULL_SNAPSHOTTER_CMD, a JSON array such as
// ["python3", "-m", "cli.main", "snapshotter"]; the harness appends
// `--root ROOT --address SOCKET`. LAZYPULL_SNAPSHOTTER_CWD sets its working
// directory. Without LAZYPULL_SNAPSHOTTER_CMD the lazypull run is skipped
// (tests/test_snapshotter_conformance.py always sets it). LAZYPULL_SNAPSHOTTER_SEED_ROOT
// names a root that a service left (one killed mid-operation, say): each suite case's
// root starts as a copy of it, so the suite runs on a service restarted on that state.
//
// It is built offline in GOPATH mode against Debian's Go sources (needs root to run:
// the suite mounts):
//
//	cd tests/conformance && GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off \
//	  GOFLAGS= GOENV=off GOCACHE=$TMP/gocache CGO_ENABLED=0 \
//	  go test -c -o $TMP/conformance.test .
//	$TMP/conformance.test -test.v -test.run '^TestConformance$/^overlayfs$'
package conformance

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

const (
	envCmd          = "LAZYPULL_SNAPSHOTTER_CMD"
	envCwd          = "LAZYPULL_SNAPSHOTTER_CWD"
	envStartTimeout = "LAZYPULL_SNAPSHOTTER_START_TIMEOUT" // Go duration, default 30s
	envStopTimeout  = "LAZYPULL_SNAPSHOTTER_STOP_TIMEOUT"  // Go duration, default 15s
	envSeedRoot     = "LAZYPULL_SNAPSHOTTER_SEED_ROOT"     // copied into each case's root

	// The name the proxy client sends in every request, as containerd does for a
	// proxy plugin configured as [proxy_plugins.lazypull].
	proxyName = "lazypull"

	// sun_path is 108 bytes including the terminating NUL.
	maxSocketPath = 107

	// How much of the service's output to log into a suite case (its tail).
	serviceLogTail = 8 << 10
)

func TestConformance(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the snapshotter conformance suite mounts: run it as root")
	}

	t.Run("overlayfs", func(t *testing.T) {
		testsuite.SnapshotterSuite(t, "overlayfs", newOverlaySnapshotter)
	})

	t.Run("lazypull", func(t *testing.T) {
		argv, err := serviceCommand()
		if err != nil {
			t.Fatal(err)
		}
		if argv == nil {
			t.Skipf("%s is not set: nothing to run the lazypull service with", envCmd)
		}
		svc := &serviceConfig{
			argv:         argv,
			dir:          os.Getenv(envCwd),
			seedRoot:     os.Getenv(envSeedRoot),
			startTimeout: durationFromEnv(t, envStartTimeout, 30*time.Second),
			stopTimeout:  durationFromEnv(t, envStopTimeout, 15*time.Second),
		}
		testsuite.SnapshotterSuite(t, "lazypull", svc.snapshotterFunc)
	})
}

// --- overlayfs: the baseline ----------------------------------------------------

func newOverlaySnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	if err := overlayutils.Supported(root); err != nil {
		return nil, nil, fmt.Errorf("overlayfs is not usable on %s: %w", root, err)
	}
	sn, err := overlay.NewSnapshotter(root)
	if err != nil {
		return nil, nil, err
	}
	return sn, sn.Close, nil
}

// --- lazypull: a service process per suite case ----------------------------------

type serviceConfig struct {
	argv         []string
	dir          string
	seedRoot     string // if set, copied into each root before the service starts
	startTimeout time.Duration
	stopTimeout  time.Duration
}

func serviceCommand() ([]string, error) {
	raw, ok := os.LookupEnv(envCmd)
	if !ok || strings.TrimSpace(raw) == "" {
		return nil, nil
	}
	var argv []string
	if err := json.Unmarshal([]byte(raw), &argv); err != nil {
		return nil, fmt.Errorf("%s must be a JSON array of strings: %w (got %q)", envCmd, err, raw)
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, fmt.Errorf("%s is an empty command: %q", envCmd, raw)
	}
	return argv, nil
}

func durationFromEnv(t *testing.T, name string, def time.Duration) time.Duration {
	raw := os.Getenv(name)
	if raw == "" {
		return def
	}
	d, err := time.ParseDuration(raw)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q is not a positive Go duration (e.g. 30s)", name, raw)
	}
	return d
}

// outputFile holds the service's stdout and stderr. A file rather than a pipe, so
// that reaping the service never waits on a descendant that still holds the pipe.
type outputFile struct {
	path string
}

// Tail is the last n bytes of the service's output.
func (o outputFile) Tail(n int) string {
	data, err := os.ReadFile(o.path)
	if err != nil {
		return fmt.Sprintf("(its output in %s cannot be read: %v)", o.path, err)
	}
	if len(data) > n {
		return "[...]" + string(data[len(data)-n:])
	}
	return string(data)
}

// service is one running snapshotter process.
type service struct {
	cfg     *serviceConfig
	root    string
	sockDir string
	socket  string
	cmd     *exec.Cmd
	output  outputFile
	exited  chan struct{} // closed once the process has been reaped
	waitErr error         // valid after exited is closed

	earlyExitReported bool // a start failure already told how it exited
}

// snapshotterFunc is the testsuite.SnapshotterFunc: a fresh service for root, its
// proxy snapshotter, and a cleanup that stops it and checks it left nothing behind.
func (cfg *serviceConfig) snapshotterFunc(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	svc, err := cfg.start(root)
	if err != nil {
		return nil, nil, err
	}
	conn, err := svc.dial(ctx)
	if err != nil {
		stopErr := svc.stop()
		return nil, nil, joinErrors(err, stopErr, svc.release())
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), proxyName)

	var once sync.Once
	var cleanupErr error
	cleanup := func() error {
		once.Do(func() {
			connErr := conn.Close()
			if connErr != nil {
				connErr = fmt.Errorf("closing the grpc connection: %w", connErr)
			}
			stopErr := svc.stop()
			// Into the suite case's log (shown with -test.v or when it fails).
			prefix := fmt.Sprintf("[lazypull snapshotter pid %d] ", svc.cmd.Process.Pid)
			for _, line := range strings.Split(strings.TrimRight(svc.output.Tail(serviceLogTail), "\n"), "\n") {
				if line != "" {
					log.G(ctx).Debug(prefix + line)
				}
			}
			cleanupErr = joinErrors(connErr, stopErr, svc.release())
		})
		return cleanupErr
	}
	return sn, cleanup, nil
}

func (cfg *serviceConfig) start(root string) (*service, error) {
	if cfg.seedRoot != "" {
		// cp -a keeps modes, owners, xattrs and hard links, as the state was left.
		out, err := exec.Command("cp", "-a", cfg.seedRoot+"/.", root).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("copying the seed root %s into %s: %v: %s", cfg.seedRoot, root, err, out)
		}
	}
	// The suite's root is under $TMPDIR and may be long; keep the socket short and
	// outside the snapshotter's root so that it cannot get in the service's way.
	sockDir, err := os.MkdirTemp("", "lzp-")
	if err != nil {
		return nil, err
	}
	socket := filepath.Join(sockDir, "s.sock")
	if len(socket) > maxSocketPath {
		os.RemoveAll(sockDir)
		if sockDir, err = os.MkdirTemp("/tmp", "lzp-"); err != nil {
			return nil, err
		}
		socket = filepath.Join(sockDir, "s.sock")
	}

	args := append(append([]string{}, cfg.argv[1:]...), "--root", root, "--address", socket)
	cmd := exec.Command(cfg.argv[0], args...)
	cmd.Dir = cfg.dir
	output := outputFile{path: filepath.Join(sockDir, "output.log")}
	logFile, err := os.Create(output.path)
	if err != nil {
		os.RemoveAll(sockDir)
		return nil, err
	}
	defer logFile.Close() // the child has its own descriptor
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group, so that anything it forks can be found and ended;
		// and it dies with this test binary if that is killed.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(sockDir)
		return nil, fmt.Errorf("starting the lazypull snapshotter %q: %w", cmd.Args, err)
	}
	svc := &service{cfg: cfg, root: root, sockDir: sockDir, socket: socket, cmd: cmd,
		output: output, exited: make(chan struct{})}
	go func() {
		svc.waitErr = cmd.Wait()
		close(svc.exited)
	}()

	if err := svc.waitForSocket(); err != nil {
		stopErr := svc.stop()
		return nil, joinErrors(err, stopErr, svc.release())
	}
	return svc, nil
}

// waitForSocket polls until the socket accepts a connection, the process exits,
// or the start timeout passes.
func (svc *service) waitForSocket() error {
	deadline := time.Now().Add(svc.cfg.startTimeout)
	for {
		select {
		case <-svc.exited:
			svc.earlyExitReported = true
			return fmt.Errorf("the lazypull snapshotter %q exited before serving on %s (%v); its output:\n%s",
				svc.cmd.Args, svc.socket, svc.waitErr, svc.output.Tail(serviceLogTail))
		default:
		}
		conn, err := net.DialTimeout("unix", svc.socket, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the lazypull snapshotter %q (pid %d) did not accept connections on %s within %s (last error: %v); its output:\n%s",
				svc.cmd.Args, svc.cmd.Process.Pid, svc.socket, svc.cfg.startTimeout, err,
				svc.output.Tail(serviceLogTail))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (svc *service) dial(ctx context.Context) (*grpc.ClientConn, error) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	socket := svc.socket
	conn, err := grpc.DialContext(dctx, "passthrough:///lazypull-snapshotter",
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("grpc dial of the lazypull snapshotter on %s: %w; its output:\n%s",
			socket, err, svc.output.Tail(serviceLogTail))
	}
	return conn, nil
}

// stop sends SIGTERM to the service's PID, SIGKILLs its process group if it has not
// exited after the stop timeout, then checks that it exited cleanly and left no
// process and no mount behind. Problems come back as one error.
func (svc *service) stop() error {
	var errs []error
	pid := svc.cmd.Process.Pid

	select {
	case <-svc.exited:
		// It stopped by itself before being asked to: a crash during the suite case,
		// or a failed start (already reported with its output).
		if !svc.earlyExitReported {
			errs = append(errs, fmt.Errorf("the lazypull snapshotter (pid %d) exited before it was stopped (%v); its output:\n%s",
				pid, svc.waitErr, svc.output.Tail(serviceLogTail)))
		}
	default:
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("SIGTERM to pid %d: %w", pid, err))
		}
		if err := svc.awaitExit(); err != nil {
			errs = append(errs, err)
		}
	}

	// Anything it forked into its process group must be gone too.
	if err := syscall.Kill(-pid, 0); err == nil {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		errs = append(errs, fmt.Errorf("the lazypull snapshotter (pid %d) left processes in its group behind; killed them", pid))
	}

	// The FUSE manager it started outlives it by design (running containers keep
	// their lazy files); a suite case ends it too, and it must stop cleanly.
	if err := stopFuseManager(svc.root, svc.cfg.stopTimeout); err != nil {
		errs = append(errs, err)
	}

	// Nothing may stay mounted in its root once it has stopped.
	if left, err := unmountUnder(svc.root); err != nil {
		errs = append(errs, err)
	} else if len(left) > 0 {
		errs = append(errs, fmt.Errorf("the lazypull snapshotter left mounts under its root after stopping (now unmounted): %s",
			strings.Join(left, ", ")))
	}
	return joinErrors(errs...)
}

// stopFuseManager sends SIGTERM to the FUSE manager serving root (found by its pid
// file and checked by its command line, as pids are reused) and waits for it to exit.
func stopFuseManager(root string, timeout time.Duration) error {
	data, err := os.ReadFile(filepath.Join(root, "fuse-manager.pid"))
	if err != nil {
		return nil // none was started, or it has already removed its pid file
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || !isFuseManager(pid) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return nil // gone meanwhile
	}
	deadline := time.Now().Add(timeout)
	for isFuseManager(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			return fmt.Errorf("the FUSE manager (pid %d) did not exit within %s of SIGTERM and was killed", pid, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// isFuseManager: pid is alive (not a zombie) and runs `lazypull fuse-manager`.
func isFuseManager(pid int) bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), "\x00fuse-manager\x00") {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z"
}

// release removes the service's socket directory (and its output) once it has stopped.
func (svc *service) release() error {
	return os.RemoveAll(svc.sockDir)
}

// awaitExit waits for the service to exit after SIGTERM, SIGKILLs its process group
// after the stop timeout, and reports anything but a clean exit (status 0).
func (svc *service) awaitExit() error {
	pid := svc.cmd.Process.Pid
	select {
	case <-svc.exited:
		if svc.waitErr != nil {
			return fmt.Errorf("the lazypull snapshotter (pid %d) did not exit cleanly on SIGTERM: %v; its output:\n%s",
				pid, svc.waitErr, svc.output.Tail(serviceLogTail))
		}
		return nil
	case <-time.After(svc.cfg.stopTimeout):
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		<-svc.exited
		return fmt.Errorf("the lazypull snapshotter (pid %d) did not exit within %s of SIGTERM and was killed; its output:\n%s",
			pid, svc.cfg.stopTimeout, svc.output.Tail(serviceLogTail))
	}
}

// unmountUnder lazily unmounts every mount point at or below dir, deepest first, and
// returns the ones it found.
func unmountUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var found []string
	prefix := strings.TrimRight(dir, "/") + "/"
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20) // 128-layer overlay option lines are long
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, prefix) {
			found = append(found, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	sort.Slice(found, func(i, j int) bool { return len(found[i]) > len(found[j]) })
	var errs []error
	for _, mp := range found {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", mp, err))
		}
	}
	return found, joinErrors(errs...)
}

// unescapeMountinfo undoes the octal escapes (\040 for a space, ...) of mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// joinErrors is errors.Join for Go 1.19: nil when there is none.
func joinErrors(errs ...error) error {
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "\n"))
}
