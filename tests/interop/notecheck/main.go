// Command notecheck is an independent check of C2SP signed notes, built on
// golang.org/x/mod/sumdb/note (the reference implementation), so the Python
// test suite can compare its own output against it.
//
// Usage: notecheck NOTEFILE LOGVKEY [WITNESSVKEY ...]
//
// LOGVKEY is a C2SP signed-note verifier key (name+hash+base64(0x01||pub)).
// Each WITNESSVKEY is a C2SP tlog-cosignature key (name+hash+base64(0x04||pub)).
// On success it prints a JSON object and exits 0; on any failure it prints the
// error on stderr and exits 1.
package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
)

// algCosignatureV1 is the C2SP tlog-cosignature key type byte; x/mod's
// NewVerifier only knows 0x01 (Ed25519), so we verify these ourselves.
const algCosignatureV1 = 0x04

// cosigVerifier is a note.Verifier for tlog-cosignature/v1 signatures.
type cosigVerifier struct {
	name  string
	hash  uint32
	pub   ed25519.PublicKey
	times map[string]uint64 // filled in on a successful Verify
}

func (v *cosigVerifier) Name() string    { return v.name }
func (v *cosigVerifier) KeyHash() uint32 { return v.hash }

// Verify checks sig = 8-byte big-endian timestamp || 64-byte Ed25519 signature
// over "cosignature/v1\ntime <T>\n" || msg, as C2SP tlog-cosignature says.
func (v *cosigVerifier) Verify(msg, sig []byte) bool {
	if len(sig) != 8+ed25519.SignatureSize {
		return false
	}
	t := binary.BigEndian.Uint64(sig[:8])
	signed := []byte(fmt.Sprintf("cosignature/v1\ntime %d\n", t))
	signed = append(signed, msg...)
	if !ed25519.Verify(v.pub, signed, sig[8:]) {
		return false
	}
	v.times[v.name] = t
	return true
}

// keyHash is the C2SP key ID: first 4 bytes of SHA-256(name || "\n" || type || pub).
func keyHash(name string, typ byte, pub []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(name))
	h.Write([]byte{'\n', typ})
	h.Write(pub)
	return binary.BigEndian.Uint32(h.Sum(nil)[:4])
}

// newCosigVerifier parses a name+hexhash+base64(0x04||pub32) key, checking
// the stated hash against the one computed from the key.
func newCosigVerifier(vkey string, times map[string]uint64) (*cosigVerifier, error) {
	name, rest, ok1 := strings.Cut(vkey, "+")
	hexHash, b64, ok2 := strings.Cut(rest, "+")
	if !ok1 || !ok2 || name == "" {
		return nil, fmt.Errorf("malformed witness key %q", vkey)
	}
	stated, err := strconv.ParseUint(hexHash, 16, 32)
	if err != nil || len(hexHash) != 8 {
		return nil, fmt.Errorf("malformed witness key hash %q", hexHash)
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) != 1+ed25519.PublicKeySize || raw[0] != algCosignatureV1 {
		return nil, fmt.Errorf("witness key %q is not base64(0x04||pub32)", name)
	}
	pub := raw[1:]
	h := keyHash(name, algCosignatureV1, pub)
	if uint32(stated) != h {
		return nil, fmt.Errorf("witness key %q: stated hash %08x, computed %08x", name, stated, h)
	}
	return &cosigVerifier{name: name, hash: h, pub: ed25519.PublicKey(pub), times: times}, nil
}

// checkpoint is the parsed C2SP tlog-checkpoint body.
type checkpoint struct {
	origin string
	size   uint64
	root   []byte
}

// parseCheckpoint reads the three mandatory lines (origin, size, root);
// further lines are optional extension lines and are allowed.
func parseCheckpoint(text string) (*checkpoint, error) {
	lines := strings.SplitAfter(text, "\n")
	if len(lines) < 4 { // three lines plus the empty tail after the last "\n"
		return nil, errors.New("checkpoint: fewer than three lines")
	}
	origin := strings.TrimSuffix(lines[0], "\n")
	if origin == "" {
		return nil, errors.New("checkpoint: empty origin")
	}
	sizeStr := strings.TrimSuffix(lines[1], "\n")
	// Decimal, no sign, no leading zeros (except "0" itself).
	if sizeStr == "" || strings.TrimLeft(sizeStr, "0123456789") != "" || (len(sizeStr) > 1 && sizeStr[0] == '0') {
		return nil, fmt.Errorf("checkpoint: bad size %q", sizeStr)
	}
	size, err := strconv.ParseUint(sizeStr, 10, 64)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: bad size %q", sizeStr)
	}
	root, err := base64.StdEncoding.Strict().DecodeString(strings.TrimSuffix(lines[2], "\n"))
	if err != nil || len(root) != 32 {
		return nil, errors.New("checkpoint: root is not base64 of 32 bytes")
	}
	return &checkpoint{origin: origin, size: size, root: root}, nil
}

func run(args []string) error {
	if len(args) < 2 {
		return errors.New("usage: notecheck NOTEFILE LOGVKEY [WITNESSVKEY ...]")
	}
	data, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	logV, err := note.NewVerifier(args[1])
	if err != nil {
		return fmt.Errorf("log key: %w", err)
	}
	verifiers := []note.Verifier{logV}
	times := map[string]uint64{}
	for _, k := range args[2:] {
		v, err := newCosigVerifier(k, times)
		if err != nil {
			return err
		}
		verifiers = append(verifiers, v)
	}

	n, err := note.Open(data, note.VerifierList(verifiers...))
	if err != nil {
		return err
	}

	// note.Open accepts a note as soon as one known signature verifies; the
	// tests want every given key to have signed, so demand that here.
	verified := []string{}
	seen := map[string]bool{}
	for _, s := range n.Sigs {
		verified = append(verified, s.Name)
		seen[s.Name] = true
	}
	for _, v := range verifiers {
		if !seen[v.Name()] {
			return fmt.Errorf("no verified signature from key %q", v.Name())
		}
	}

	cp, err := parseCheckpoint(n.Text)
	if err != nil {
		return err
	}

	out := map[string]any{
		"text":              n.Text,
		"verified":          verified,
		"cosignature_times": times,
		"origin":            cp.origin,
		"size":              cp.size,
		"root_hex":          hex.EncodeToString(cp.root),
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		return err
	}
	_, err = os.Stdout.Write(buf.Bytes())
	return err
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "notecheck:", err)
		os.Exit(1)
	}
}
