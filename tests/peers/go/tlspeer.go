// tlspeer: a crypto/tls client or echo server for tlstap's tests (tests/peers/gotls.py).
//
// Built in the test set-up with each Go toolchain found, in several ways (default, stripped,
// PIE), so tlstap gotls meets real Go binaries. Every connection's plaintext, as this process
// passed it to (*tls.Conn).Write and got it from (*tls.Conn).Read, goes to -out as one JSON
// line (pid, local, remote, sent, received): the oracle the captures are compared with.
// -keylog sets tls.Config.KeyLogWriter: the oracle for tlstap gotls -m keylog.
//
//	tlspeer server -cert C -key K [-keylog F] -out F          prints "PORT n", echoes until EOF
//	tlspeer client -port P [-conns N] [-size S] [-wait] ...   N concurrent connections
//	tlspeer https -cert C -key K [-port P]                    a tiny HTTPS server (benchmarks)
//
// Only what Go 1.17 has is used, so the Debian toolchain (1.19) builds it.
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
)

type transcript struct {
	Pid      int           `json:"pid"`
	Local    []interface{} `json:"local"`
	Remote   []interface{} `json:"remote"`
	Sent     string        `json:"sent"`
	Received string        `json:"received"`
	Error    *string       `json:"error"`
}

var outMu sync.Mutex

func addr(a net.Addr) []interface{} {
	t := a.(*net.TCPAddr)
	return []interface{}{t.IP.String(), t.Port}
}

func record(out *os.File, c *tls.Conn, sent, received []byte, err error) {
	t := transcript{Pid: os.Getpid(), Local: addr(c.LocalAddr()), Remote: addr(c.RemoteAddr()),
		Sent: base64.StdEncoding.EncodeToString(sent), Received: base64.StdEncoding.EncodeToString(received)}
	if err != nil {
		s := err.Error()
		t.Error = &s
	}
	line, _ := json.Marshal(t)
	outMu.Lock()
	out.Write(append(line, '\n'))
	outMu.Unlock()
}

func config(keylog string, maxver int) *tls.Config {
	cfg := &tls.Config{InsecureSkipVerify: true}
	if keylog != "" {
		f, err := os.OpenFile(keylog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0600)
		if err != nil {
			fail(err)
		}
		cfg.KeyLogWriter = f
	}
	if maxver == 12 {
		cfg.MaxVersion = tls.VersionTLS12
	}
	return cfg
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "tlspeer:", err)
	os.Exit(1)
}

// echo reads until EOF through (*tls.Conn).Read and writes each piece back with Write.
func echo(c *tls.Conn, out *os.File) {
	defer c.Close()
	var sent, received []byte
	buf := make([]byte, 64<<10)
	var err error
	for {
		n, rerr := c.Read(buf)
		if n > 0 {
			received = append(received, buf[:n]...)
			if _, err = c.Write(buf[:n]); err != nil {
				break
			}
			sent = append(sent, buf[:n]...)
		}
		if rerr != nil {
			if rerr != io.EOF {
				err = rerr
			}
			break
		}
	}
	record(out, c, sent, received, err)
}

// exchange writes payload (in pieces of `piece` bytes, 0 = one Write), half-closes, and reads
// the echo until EOF.
func exchange(c *tls.Conn, payload []byte, piece int, out *os.File, resume chan struct{}) error {
	defer c.Close()
	var received []byte
	done := make(chan error, 1)
	reading := make(chan struct{})
	go func() {
		close(reading)
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			received = append(received, buf[:n]...)
			if err == io.EOF {
				done <- nil
				return
			} else if err != nil {
				done <- err
				return
			}
		}
	}()
	if resume != nil {
		// -pause: both ends' Reads are (about to be) blocked; say so, wait for the go-ahead
		<-reading
		fmt.Println("READY")
		<-resume
	}
	var err error
	for off := 0; off < len(payload) && err == nil; {
		end := len(payload)
		if piece > 0 && off+piece < end {
			end = off + piece
		}
		_, err = c.Write(payload[off:end])
		off = end
	}
	if err == nil {
		err = c.CloseWrite()
	}
	if err == nil {
		err = <-done
	}
	record(out, c, payload, received, err)
	return err
}

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: tlspeer server|client|https [flags]"))
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	cert := fs.String("cert", "", "certificate (PEM)")
	key := fs.String("key", "", "private key (PEM)")
	keylog := fs.String("keylog", "", "tls.Config.KeyLogWriter file")
	outPath := fs.String("out", os.DevNull, "transcripts (JSON lines)")
	maxver := fs.Int("maxver", 13, "12: at most TLS 1.2")
	port := fs.Int("port", 0, "server port (client: to connect to)")
	conns := fs.Int("conns", 1, "client: concurrent connections")
	size := fs.Int("size", 1000, "client: payload bytes per connection")
	piece := fs.Int("piece", 0, "client: bytes per Write (0: one Write)")
	wait := fs.Bool("wait", false, "client: wait for a line on stdin before connecting")
	pause := fs.Bool("pause", false, "client: after the handshakes print READY per connection, then "+
		"wait for a line on stdin before sending (tests start a capture in between)")
	lenprefix := fs.Bool("lenprefix", false, "client: send an 8-byte big-endian length first "+
		"(the request format of tests/peers/pyssl_peer.py, which echoes the body)")
	fs.Parse(os.Args[2:])
	out, err := os.OpenFile(*outPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0600)
	if err != nil {
		fail(err)
	}
	cfg := config(*keylog, *maxver)

	switch os.Args[1] {
	case "server", "https":
		pair, err := tls.LoadX509KeyPair(*cert, *key)
		if err != nil {
			fail(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(*port))
		if err != nil {
			fail(err)
		}
		fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
		os.Stdout.Sync()
		if os.Args[1] == "https" {
			body := make([]byte, *size) // printable, like the benchmark kit's base64 files
			for i := range body {
				body[i] = 'a' + byte(i%26)
			}
			http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
			fail(http.Serve(tls.NewListener(ln, cfg), nil))
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				fail(err)
			}
			go echo(tls.Server(c, cfg), out)
		}
	case "client":
		if *wait {
			bufio.NewReader(os.Stdin).ReadString('\n')
		}
		var wg sync.WaitGroup
		failed := false
		var resume chan struct{}
		if *pause {
			resume = make(chan struct{})
			go func() {
				bufio.NewReader(os.Stdin).ReadString('\n')
				close(resume)
			}()
		}
		for i := 0; i < *conns; i++ {
			payload := make([]byte, *size)
			rand.Read(payload)
			if *lenprefix {
				hdr := make([]byte, 8)
				binary.BigEndian.PutUint64(hdr, uint64(*size))
				payload = append(hdr, payload...)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := tls.Dial("tcp", "127.0.0.1:"+strconv.Itoa(*port), cfg)
				if err == nil {
					err = exchange(c, payload, *piece, out, resume)
				}
				if err != nil {
					fmt.Fprintln(os.Stderr, "tlspeer:", err)
					failed = true
				}
			}()
		}
		wg.Wait()
		if failed {
			os.Exit(1)
		}
	default:
		fail(fmt.Errorf("unknown mode %q", os.Args[1]))
	}
}
