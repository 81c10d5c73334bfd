// Command estargz-checker drives the reference eStargz implementation
// (github.com/containerd/stargz-snapshotter/estargz, with its zstdchunked
// subpackage) so lazypull's tests can check interoperability both ways.
//
//	estargz-checker verify BLOB -toc-digest D [-expect-prefetch a,b,... | -expect-no-prefetch]
//	estargz-checker build IN.tar OUT [-zstd] [-chunk-size N] [-prioritize a,b,...]
//
// Each subcommand prints one JSON object on stdout. On any failure it prints
// "estargz-checker: ..." on stderr and exits with status 1 (2 for usage errors).
//
// It is built in GOPATH mode against the Debian-packaged sources, offline:
//
//	cd tests/interop/estargz-checker && GO111MODULE=off GOPATH=/usr/share/gocode \
//	  GOPROXY=off GOFLAGS= GOENV=off CGO_ENABLED=0 GOCACHE=$TMP/gocache \
//	  go build -o $TMP/estargz-checker .
package main

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

const (
	tocTarName      = "stargz.index.json"
	xattrPAXPrefix  = "SCHILY.xattr."
	landmarkPayload = 0x0f
)

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	if len(os.Args) < 2 {
		fail(usageError{"usage: estargz-checker verify|build ..."})
	}
	var (
		out interface{}
		err error
	)
	switch os.Args[1] {
	case "verify":
		out, err = runVerify(os.Args[2:])
	case "build":
		out, err = runBuild(os.Args[2:])
	default:
		err = usageError{fmt.Sprintf("unknown subcommand %q (want verify or build)", os.Args[1])}
	}
	if err != nil {
		fail(err)
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "estargz-checker: %v\n", err)
	var u usageError
	if errors.As(err, &u) {
		os.Exit(2)
	}
	os.Exit(1)
}

// parseInterspersed parses flags that may come before, between or after the
// positional arguments, and requires exactly `want` positional arguments.
func parseInterspersed(fs *flag.FlagSet, args []string, want int, usage string) ([]string, error) {
	fs.SetOutput(io.Discard)
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, usageError{fmt.Sprintf("%v\nusage: %s", err, usage)}
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	if len(positional) != want {
		return nil, usageError{fmt.Sprintf("want %d positional argument(s), got %d\nusage: %s",
			want, len(positional), usage)}
	}
	return positional, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// modtime renders a tar header's time as the TOC records it (RFC3339, UTC,
// rounded to the second; empty for the zero time or the epoch).
func modtime(t time.Time) string {
	if t.IsZero() || t.Unix() == 0 {
		return ""
	}
	return t.UTC().Round(time.Second).Format(time.RFC3339)
}

// ---------------------------------------------------------------------------
// verify

type verifyResult struct {
	DiffID                 string `json:"diffID"`
	Files                  int    `json:"files"`
	Entries                int    `json:"entries"`
	PrefetchLandmarkOffset int64  `json:"prefetchLandmarkOffset"`
	TOCDigest              string `json:"tocDigest"`
	Compression            string `json:"compression"`
	Chunks                 int    `json:"chunks"`
	Landmark               string `json:"landmark"`
}

// fileCheck is what verify learned about one regular file from the chunked view,
// to compare with the plain decompressed stream afterwards.
type fileCheck struct {
	digest digest.Digest
	size   int64
}

func runVerify(args []string) (interface{}, error) {
	const usage = "estargz-checker verify BLOB -toc-digest D [-expect-prefetch a,b,...|-expect-no-prefetch]"
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	tocDigestFlag := fs.String("toc-digest", "", "expected TOC digest (sha256:...)")
	expectPrefetch := fs.String("expect-prefetch", "", "comma-separated files that must lie before .prefetch.landmark")
	expectNoPrefetch := fs.Bool("expect-no-prefetch", false, "require .no.prefetch.landmark")
	pos, err := parseInterspersed(fs, args, 1, usage)
	if err != nil {
		return nil, err
	}
	if *tocDigestFlag == "" {
		return nil, usageError{"-toc-digest is required\nusage: " + usage}
	}
	prioritized := splitList(*expectPrefetch)
	if len(prioritized) > 0 && *expectNoPrefetch {
		return nil, usageError{"-expect-prefetch and -expect-no-prefetch exclude each other"}
	}
	wantTOC, err := digest.Parse(*tocDigestFlag)
	if err != nil {
		return nil, fmt.Errorf("bad -toc-digest: %w", err)
	}

	f, err := os.Open(pos[0])
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	sr := io.NewSectionReader(f, 0, st.Size())

	// 1. The reference reader, with every decompressor it knows.
	r, err := estargz.Open(sr, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		return nil, fmt.Errorf("reference estargz.Open: %w", err)
	}
	verifier, err := r.VerifyTOC(wantTOC)
	if err != nil {
		return nil, fmt.Errorf("reference VerifyTOC: %w", err)
	}

	// 2. The TOC itself, in order, through the decompressor whose footer matches.
	toc, compression, err := readTOC(sr, r.TOCDigest())
	if err != nil {
		return nil, err
	}
	res := &verifyResult{TOCDigest: r.TOCDigest().String(), Compression: compression}

	// 3. Every regular file through the reference's chunk verifier.
	files, chunks, err := verifyFiles(r, verifier, toc)
	if err != nil {
		return nil, err
	}
	res.Files = len(files)
	res.Chunks = chunks

	// 4. The whole blob as a plain stream: a tar that agrees with the TOC.
	diffID, entries, err := checkStream(sr, compression, toc, files, r.TOCDigest())
	if err != nil {
		return nil, err
	}
	res.DiffID = diffID.String()
	res.Entries = entries

	// 5. Landmarks.
	if err := checkLandmarks(r, toc, prioritized, *expectNoPrefetch, res); err != nil {
		return nil, err
	}
	return res, nil
}

// readTOC finds the decompressor whose footer parses and whose TOC has the
// digest the reference reader reported, and returns that TOC in its order.
func readTOC(sr *io.SectionReader, want digest.Digest) (*estargz.JTOC, string, error) {
	type candidate struct {
		name string
		d    estargz.Decompressor
	}
	candidates := []candidate{
		{"gzip", new(estargz.GzipDecompressor)},
		{"gzip-legacy", new(estargz.LegacyGzipDecompressor)},
		{"zstd", new(zstdchunked.Decompressor)},
	}
	var errs []string
	for _, c := range candidates {
		toc, err := tryTOC(sr, c.d, want)
		if err == nil {
			return toc, c.name, nil
		}
		errs = append(errs, fmt.Sprintf("%s: %v", c.name, err))
	}
	return nil, "", fmt.Errorf("no decompressor yields the TOC: %s", strings.Join(errs, "; "))
}

func tryTOC(sr *io.SectionReader, d estargz.Decompressor, want digest.Digest) (toc *estargz.JTOC, err error) {
	defer func() {
		if p := recover(); p != nil { // the reference's footer parsers index without bounds checks
			err = fmt.Errorf("footer parser panicked: %v", p)
		}
	}()
	fsize := d.FooterSize()
	if sr.Size() < fsize {
		return nil, fmt.Errorf("blob is smaller than the footer")
	}
	footer := make([]byte, fsize)
	if _, err := sr.ReadAt(footer, sr.Size()-fsize); err != nil {
		return nil, err
	}
	_, tocOff, tocSize, err := d.ParseFooter(footer)
	if err != nil {
		return nil, err
	}
	if tocSize <= 0 {
		tocSize = sr.Size() - tocOff - fsize
	}
	if tocOff < 0 || tocSize <= 0 || tocOff+tocSize > sr.Size() {
		return nil, fmt.Errorf("footer points outside the blob (%d+%d)", tocOff, tocSize)
	}
	toc, dgst, err := d.ParseTOC(io.NewSectionReader(sr, tocOff, tocSize))
	if err != nil {
		return nil, err
	}
	if dgst != want {
		return nil, fmt.Errorf("TOC digest %s, reader reported %s", dgst, want)
	}
	return toc, nil
}

// fileGroup is one regular-file entry of the TOC with the chunk entries after it.
type fileGroup struct {
	index  int // position of the reg entry in the TOC
	reg    *estargz.TOCEntry
	chunks []*estargz.TOCEntry // reg itself first when it has data
}

func groupFiles(toc *estargz.JTOC) ([]fileGroup, error) {
	var groups []fileGroup
	open := false // the previous entry is a non-empty reg or one of its chunks
	for i, e := range toc.Entries {
		switch e.Type {
		case "reg":
			g := fileGroup{index: i, reg: e}
			if e.Size > 0 {
				g.chunks = append(g.chunks, e)
			}
			groups = append(groups, g)
			open = e.Size > 0
		case "chunk":
			if !open {
				return nil, fmt.Errorf("TOC entry #%d: chunk of %q does not follow its regular file", i, e.Name)
			}
			groups[len(groups)-1].chunks = append(groups[len(groups)-1].chunks, e)
		default:
			open = false
		}
	}
	return groups, nil
}

func verifyFiles(r *estargz.Reader, v estargz.TOCEntryVerifier, toc *estargz.JTOC) (map[int]fileCheck, int, error) {
	groups, err := groupFiles(toc)
	if err != nil {
		return nil, 0, err
	}
	lastIndex := map[string]int{} // clean name -> index of its last non-chunk TOC entry
	for i, e := range toc.Entries {
		if e.Type != "chunk" {
			lastIndex[cleanName(e.Name)] = i
		}
	}
	files := make(map[int]fileCheck)
	chunks := 0
	for _, g := range groups {
		name := cleanName(g.reg.Name)
		if lastIndex[name] != g.index {
			// A later entry of the same name replaces this one, as extracting would.
			continue
		}
		e, ok := r.Lookup(name)
		if !ok {
			return nil, 0, fmt.Errorf("%q: reference Lookup finds nothing", name)
		}
		if e.Type != "reg" || e.Size != g.reg.Size {
			return nil, 0, fmt.Errorf("%q: reference Lookup gives a %s of %d bytes, the TOC a reg of %d",
				name, e.Type, e.Size, g.reg.Size)
		}
		sra, err := r.OpenFile(name)
		if err != nil {
			return nil, 0, fmt.Errorf("%q: reference OpenFile: %w", name, err)
		}
		h := sha256.New()
		var off int64
		n := 0
		for off < e.Size {
			ce, ok := r.ChunkEntryForOffset(name, off)
			if !ok {
				return nil, 0, fmt.Errorf("%q: no chunk holds offset %d", name, off)
			}
			if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
				return nil, 0, fmt.Errorf("%q: chunk for offset %d starts at %d (size %d)",
					name, off, ce.ChunkOffset, ce.ChunkSize)
			}
			cv, err := v.Verifier(ce)
			if err != nil {
				return nil, 0, fmt.Errorf("%q: chunk at %d: %w", name, off, err)
			}
			buf := make([]byte, ce.ChunkSize)
			got, err := sra.ReadAt(buf, ce.ChunkOffset)
			if got != len(buf) || (err != nil && err != io.EOF) {
				return nil, 0, fmt.Errorf("%q: reading chunk at %d: %d of %d bytes: %v",
					name, off, got, len(buf), err)
			}
			if _, err := cv.Write(buf); err != nil {
				return nil, 0, err
			}
			if !cv.Verified() {
				return nil, 0, fmt.Errorf("%q: chunk at %d (blob offset %d) fails its chunkDigest",
					name, off, ce.Offset)
			}
			h.Write(buf)
			off += ce.ChunkSize
			n++
		}
		if n != len(g.chunks) {
			return nil, 0, fmt.Errorf("%q: %d chunks read, the TOC lists %d", name, n, len(g.chunks))
		}
		sum := digest.NewDigest(digest.SHA256, h)
		if e.Digest != "" && digest.Digest(e.Digest) != sum {
			return nil, 0, fmt.Errorf("%q: content is %s, TOC digest is %s", name, sum, e.Digest)
		}
		if e.Digest == "" && e.Size > 0 {
			return nil, 0, fmt.Errorf("%q: regular file without a digest", name)
		}
		// Once more in one read across every chunk boundary.
		whole := make([]byte, e.Size)
		if e.Size > 0 {
			if got, err := sra.ReadAt(whole, 0); got != len(whole) || (err != nil && err != io.EOF) {
				return nil, 0, fmt.Errorf("%q: whole-file read: %d of %d bytes: %v", name, got, len(whole), err)
			}
		}
		if digest.FromBytes(whole) != sum {
			return nil, 0, fmt.Errorf("%q: whole-file read differs from its chunks", name)
		}
		files[g.index] = fileCheck{digest: sum, size: e.Size}
		chunks += n
	}
	return files, chunks, nil
}

var tarTypes = map[byte]string{
	tar.TypeReg:     "reg",
	tar.TypeRegA:    "reg",
	tar.TypeDir:     "dir",
	tar.TypeSymlink: "symlink",
	tar.TypeLink:    "hardlink",
	tar.TypeChar:    "char",
	tar.TypeBlock:   "block",
	tar.TypeFifo:    "fifo",
}

func checkStream(sr *io.SectionReader, compression string,
	toc *estargz.JTOC, files map[int]fileCheck, tocDigest digest.Digest) (digest.Digest, int, error) {
	var plain io.Reader
	whole := io.NewSectionReader(sr, 0, sr.Size())
	if compression == "zstd" {
		zr, err := zstd.NewReader(whole)
		if err != nil {
			return "", 0, err
		}
		defer zr.Close()
		plain = zr
	} else {
		zr, err := gzip.NewReader(whole) // multistream: every member in turn
		if err != nil {
			return "", 0, fmt.Errorf("blob is not gzip: %w", err)
		}
		defer zr.Close()
		plain = zr
	}
	diff := sha256.New()
	stream := io.TeeReader(plain, diff)
	tr := tar.NewReader(stream)

	var nonChunk []int
	for i, e := range toc.Entries {
		if e.Type != "chunk" {
			nonChunk = append(nonChunk, i)
		}
	}
	seenTOC := false
	n := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", 0, fmt.Errorf("decompressed blob is not a valid tar after %d entries: %w", n, err)
		}
		if seenTOC {
			return "", 0, fmt.Errorf("tar entry %q follows the TOC entry", h.Name)
		}
		if n == len(nonChunk) {
			if compression == "zstd" || h.Name != tocTarName {
				return "", 0, fmt.Errorf("tar entry %q is not in the TOC", h.Name)
			}
			data, err := io.ReadAll(tr)
			if err != nil {
				return "", 0, err
			}
			if digest.FromBytes(data) != tocDigest {
				return "", 0, fmt.Errorf("the stream's %s differs from the TOC in the footer", tocTarName)
			}
			seenTOC = true
			continue
		}
		idx := nonChunk[n]
		if err := compareHeader(h, toc.Entries[idx]); err != nil {
			return "", 0, fmt.Errorf("tar entry #%d: %w", n, err)
		}
		if h.Typeflag == tar.TypeReg || h.Typeflag == tar.TypeRegA {
			hd := sha256.New()
			got, err := io.Copy(hd, tr)
			if err != nil {
				return "", 0, fmt.Errorf("%q: reading data from the stream: %w", h.Name, err)
			}
			if fc, ok := files[idx]; ok {
				if got != fc.size || digest.NewDigest(digest.SHA256, hd) != fc.digest {
					return "", 0, fmt.Errorf("%q: stream data differs from the chunked read", h.Name)
				}
			}
		}
		n++
	}
	if n != len(nonChunk) {
		return "", 0, fmt.Errorf("tar stream has %d entries, the TOC %d", n, len(nonChunk))
	}
	if compression != "zstd" && !seenTOC {
		return "", 0, fmt.Errorf("gzip stream lacks the %s entry", tocTarName)
	}
	if _, err := io.Copy(io.Discard, stream); err != nil {
		return "", 0, fmt.Errorf("draining the stream: %w", err)
	}
	return digest.NewDigest(digest.SHA256, diff), n, nil
}

func compareHeader(h *tar.Header, e *estargz.TOCEntry) error {
	kind, ok := tarTypes[h.Typeflag]
	if !ok {
		return fmt.Errorf("%q has unsupported type %q", h.Name, h.Typeflag)
	}
	xattrs := map[string][]byte{}
	for k, v := range h.PAXRecords {
		if strings.HasPrefix(k, xattrPAXPrefix) {
			xattrs[k[len(xattrPAXPrefix):]] = []byte(v)
		}
	}
	tocXattrs := e.Xattrs
	if tocXattrs == nil {
		tocXattrs = map[string][]byte{}
	}
	type check struct {
		what       string
		tar, inTOC interface{}
	}
	checks := []check{
		{"name", cleanName(h.Name), cleanName(e.Name)},
		{"type", kind, e.Type},
		{"mode", h.Mode, e.Mode},
		{"uid", h.Uid, e.UID},
		{"gid", h.Gid, e.GID},
		{"modtime", modtime(h.ModTime), e.ModTime3339},
		{"xattrs", xattrs, tocXattrs},
	}
	// The reference writes a user or group name only where it changes for an id.
	if e.Uname != "" {
		checks = append(checks, check{"user name", h.Uname, e.Uname})
	}
	if e.Gname != "" {
		checks = append(checks, check{"group name", h.Gname, e.Gname})
	}
	switch kind {
	case "reg":
		checks = append(checks, check{"size", h.Size, e.Size})
	case "symlink", "hardlink":
		checks = append(checks, check{"link name", h.Linkname, e.LinkName})
	case "char", "block":
		checks = append(checks, check{"device", [2]int64{h.Devmajor, h.Devminor},
			[2]int64{int64(e.DevMajor), int64(e.DevMinor)}})
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.tar, c.inTOC) {
			return fmt.Errorf("%q: %s is %v in the tar, %v in the TOC", h.Name, c.what, c.tar, c.inTOC)
		}
	}
	return nil
}

func checkLandmarks(r *estargz.Reader, toc *estargz.JTOC, prioritized []string, expectNone bool, res *verifyResult) error {
	pre, hasPre := r.Lookup(estargz.PrefetchLandmark)
	_, hasNo := r.Lookup(estargz.NoPrefetchLandmark)
	if hasPre && hasNo {
		return fmt.Errorf("blob has both %s and %s", estargz.PrefetchLandmark, estargz.NoPrefetchLandmark)
	}
	for _, name := range []string{estargz.PrefetchLandmark, estargz.NoPrefetchLandmark} {
		e, ok := r.Lookup(name)
		if !ok {
			continue
		}
		res.Landmark = name
		if e.Type != "reg" || e.Size != 1 {
			return fmt.Errorf("%s is a %s of %d bytes, want a 1-byte regular file", name, e.Type, e.Size)
		}
		sra, err := r.OpenFile(name)
		if err != nil {
			return err
		}
		b := make([]byte, 1)
		if _, err := sra.ReadAt(b, 0); err != nil && err != io.EOF {
			return fmt.Errorf("%s: %w", name, err)
		}
		if b[0] != landmarkPayload {
			return fmt.Errorf("%s holds %#x, want %#x", name, b[0], landmarkPayload)
		}
	}
	if hasPre {
		res.PrefetchLandmarkOffset = pre.Offset
	}
	if expectNone && !hasNo {
		return fmt.Errorf("%s is missing", estargz.NoPrefetchLandmark)
	}
	if len(prioritized) == 0 {
		return nil
	}
	if !hasPre {
		return fmt.Errorf("%s is missing", estargz.PrefetchLandmark)
	}
	landmarkIndex := -1
	lastIndex := map[string]int{} // clean name -> index of its last non-chunk TOC entry
	for i, e := range toc.Entries {
		if e.Type == "chunk" {
			continue
		}
		lastIndex[cleanName(e.Name)] = i
		if cleanName(e.Name) == estargz.PrefetchLandmark {
			landmarkIndex = i
		}
	}
	groups, err := groupFiles(toc)
	if err != nil {
		return err
	}
	byIndex := map[int]fileGroup{}
	for _, g := range groups {
		byIndex[g.index] = g
	}
	for _, p := range prioritized {
		name := cleanName(p)
		idx, ok := lastIndex[name]
		if !ok {
			return fmt.Errorf("prioritized file %q is not in the TOC", p)
		}
		if idx > landmarkIndex {
			return fmt.Errorf("prioritized file %q is TOC entry #%d, after the landmark (#%d)",
				p, idx, landmarkIndex)
		}
		// The data that reading it needs: its own, or its hard-link target's.
		e, ok := r.Lookup(name)
		if !ok {
			return fmt.Errorf("prioritized file %q: reference Lookup finds nothing", p)
		}
		if e.Type != "reg" || e.Size == 0 {
			continue
		}
		g, ok := byIndex[lastIndex[cleanName(e.Name)]]
		if !ok {
			return fmt.Errorf("prioritized file %q: its data entry is not in the TOC", p)
		}
		for _, c := range g.chunks {
			if c.Offset >= pre.Offset {
				return fmt.Errorf("prioritized file %q has data at blob offset %d, not before the landmark at %d",
					p, c.Offset, pre.Offset)
			}
		}
	}
	return nil
}

// ---------------------------------------------------------------------------
// build

// zstdChunked pairs the zstdchunked compressor and decompressor into the
// estargz.Compression that Build wants.
type zstdChunked struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

type buildResult struct {
	TOCDigest   string            `json:"tocDigest"`
	DiffID      string            `json:"diffID"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

func runBuild(args []string) (interface{}, error) {
	const usage = "estargz-checker build IN.tar OUT [-zstd] [-chunk-size N] [-prioritize a,b,...]"
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	useZstd := fs.Bool("zstd", false, "build zstd:chunked instead of gzip eStargz")
	chunkSize := fs.String("chunk-size", "", "chunk size in bytes (default: the reference's 4 MiB)")
	prioritize := fs.String("prioritize", "", "comma-separated prioritized files")
	pos, err := parseInterspersed(fs, args, 2, usage)
	if err != nil {
		return nil, err
	}
	var opts []estargz.Option
	if *chunkSize != "" {
		n, err := strconv.Atoi(*chunkSize)
		if err != nil || n <= 0 {
			return nil, usageError{fmt.Sprintf("bad -chunk-size %q", *chunkSize)}
		}
		opts = append(opts, estargz.WithChunkSize(n))
	}
	if files := splitList(*prioritize); len(files) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(files))
	}
	var annotations map[string]string
	if *useZstd {
		annotations = map[string]string{}
		opts = append(opts, estargz.WithCompression(zstdChunked{
			Compressor: &zstdchunked.Compressor{
				CompressionLevel: zstd.SpeedDefault,
				Metadata:         annotations,
			},
			Decompressor: new(zstdchunked.Decompressor),
		}))
	}

	in, err := os.Open(pos[0])
	if err != nil {
		return nil, err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return nil, err
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		return nil, fmt.Errorf("reference estargz.Build: %w", err)
	}
	out, err := os.Create(pos[1])
	if err != nil {
		blob.Close()
		return nil, err
	}
	size, copyErr := io.Copy(out, blob)
	closeErr := blob.Close()
	if err := out.Close(); err != nil && copyErr == nil {
		copyErr = err
	}
	if copyErr != nil {
		return nil, fmt.Errorf("writing %s: %w", pos[1], copyErr)
	}
	if closeErr != nil {
		return nil, closeErr
	}
	return &buildResult{
		TOCDigest:   blob.TOCDigest().String(),
		DiffID:      blob.DiffID().String(),
		Size:        size,
		Annotations: annotations,
	}, nil
}
