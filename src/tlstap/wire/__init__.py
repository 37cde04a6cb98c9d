"""The wire source's user-space half: TCP reassembly and TLS decryption of captured packets (issue 17)."""
