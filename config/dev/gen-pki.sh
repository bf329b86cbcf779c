#!/usr/bin/env bash
# Generate a throw-away PKI for local testing and demos of iotcored.
#
# Usage: gen-pki.sh [--force] DIR
#
# Writes into DIR (created if missing):
#   ca.pem ca.key                      root CA (EC P-256)
#   server.pem server.key              CN=localhost, SAN DNS:localhost, IP:127.0.0.1, IP:::1
#   client.pem client.key              CN=iotcored-test, EC P-256, PKCS#8 key
#   client-rsa.pem client-rsa.key      RSA 2048 client, traditional "BEGIN RSA PRIVATE KEY"
#   client-ec-sec1.key                 client.key as traditional "BEGIN EC PRIVATE KEY"
#   client-p384.pem client-p384.key    CN=iotcored-test-p384, EC P-384 client
#   p521.key                           an EC P-521 key (a curve iotcored does not sign with)
#   client-nonl.pem client-nonl.key ca-nonl.pem   the same without the trailing newline
#   client-chain.pem client-chain.key  leaf signed by an intermediate CA, followed by the intermediate
#   client-expired.pem client-expired.key         valid only in January 2020
#   untrusted-ca.pem untrusted-ca.key  an unrelated CA
#   client-untrusted.pem client-untrusted.key     client signed by untrusted-ca
#   server-wronghost.pem server-wronghost.key     signed by ca, SAN DNS:wrong.example.com only
#   other.key                          a key that matches no certificate
#
# Idempotent: does nothing if DIR/ca.pem exists, unless --force. Concurrent
# runs on the same DIR are serialised with flock(1) where available, and
# ca.pem is moved into place last, so a present ca.pem means a complete set.
# Everything here is test material: keys are world-readable on purpose.
set -euo pipefail

force=0
dir=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "gen-pki.sh: unknown option $arg" >&2
            exit 2
            ;;
        *)
            if [[ -n "$dir" ]]; then
                echo "gen-pki.sh: only one DIR" >&2
                exit 2
            fi
            dir="$arg"
            ;;
    esac
done
if [[ -z "$dir" ]]; then
    echo "usage: gen-pki.sh [--force] DIR" >&2
    exit 2
fi

umask 022
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

if command -v flock >/dev/null 2>&1; then
    exec 9>"$dir/.gen-pki.lock"
    flock 9
fi

if [[ -e "$dir/ca.pem" && "$force" -eq 0 ]]; then
    exit 0
fi

tmp="$(mktemp -d "$dir/.gen-pki.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

# Our own config, so that the host's openssl.cnf (default extensions,
# req prompts) cannot change the result.
cat >ext.cnf <<'EOF'
[ req ]
distinguished_name = req_dn
prompt = no
[ req_dn ]
CN = unused

[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ intermediate_ext ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ server_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ wronghost_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:wrong.example.com
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[ client_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = DNS:iotcored-test
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

# Only for the expired certificate: "openssl x509 -req" on OpenSSL 3.0
# cannot set explicit dates, "openssl ca" can.
[ ca ]
default_ca = test_ca
[ test_ca ]
database = index.txt
new_certs_dir = newcerts
serial = serial.txt
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
copy_extensions = none
[ policy_any ]
commonName = supplied
EOF

days=3650

ec_key() { # OUT: EC P-256 key in PKCS#8 ("BEGIN PRIVATE KEY")
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

serial() { # a random positive 128-bit serial
    echo "0x$(openssl rand -hex 16)"
}

self_signed_ca() { # KEY CERT CN
    openssl req -config ext.cnf -new -x509 -key "$1" -out "$2" -subj "/CN=$3" \
        -days "$days" -sha256 -set_serial "$(serial)" -extensions ca_ext
}

issue() { # KEY CERT CN ISSUER_CERT ISSUER_KEY EXTENSIONS
    openssl req -config ext.cnf -new -key "$1" -subj "/CN=$3" -out "$2.csr"
    openssl x509 -req -in "$2.csr" -CA "$4" -CAkey "$5" -set_serial "$(serial)" \
        -days "$days" -sha256 -extfile ext.cnf -extensions "$6" -out "$2" 2>/dev/null
    rm -f "$2.csr"
}

# Root CA and the main server and client pairs.
ec_key ca.key
self_signed_ca ca.key ca.pem "iotcored test CA"
ec_key server.key
issue server.key server.pem localhost ca.pem ca.key server_ext
ec_key client.key
issue client.key client.pem iotcored-test ca.pem ca.key client_ext

# Key-format variants.
openssl genrsa -traditional -out client-rsa.key 2048 2>/dev/null
issue client-rsa.key client-rsa.pem iotcored-test-rsa ca.pem ca.key client_ext
openssl ec -in client.key -out client-ec-sec1.key 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out client-p384.key 2>/dev/null
issue client-p384.key client-p384.pem iotcored-test-p384 ca.pem ca.key client_ext
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out p521.key 2>/dev/null
for f in client.pem client.key ca.pem; do
    printf '%s' "$(cat "$f")" >"${f%.*}-nonl.${f##*.}"
done

# A chain: root -> intermediate -> leaf; the file holds leaf then intermediate.
ec_key intermediate.key
issue intermediate.key intermediate.pem "iotcored test intermediate CA" ca.pem ca.key intermediate_ext
ec_key client-chain.key
issue client-chain.key client-chain.leaf.pem iotcored-test-chain intermediate.pem intermediate.key client_ext
cat client-chain.leaf.pem intermediate.pem >client-chain.pem
rm -f client-chain.leaf.pem intermediate.key intermediate.pem

# Expired: valid only in January 2020.
ec_key client-expired.key
mkdir newcerts
: >index.txt
openssl rand -hex 16 >serial.txt
openssl req -config ext.cnf -new -key client-expired.key -subj "/CN=iotcored-test-expired" \
    -out client-expired.csr
openssl ca -config ext.cnf -batch -notext -cert ca.pem -keyfile ca.key \
    -startdate 20200101000000Z -enddate 20200201000000Z -extfile ext.cnf -extensions client_ext \
    -in client-expired.csr -out client-expired.pem 2>/dev/null
rm -rf newcerts index.txt* serial.txt* client-expired.csr

# Signed by a CA that nobody trusts.
ec_key untrusted-ca.key
self_signed_ca untrusted-ca.key untrusted-ca.pem "iotcored untrusted CA"
ec_key client-untrusted.key
issue client-untrusted.key client-untrusted.pem iotcored-test untrusted-ca.pem untrusted-ca.key client_ext

# A server certificate for the wrong host name.
ec_key server-wronghost.key
issue server-wronghost.key server-wronghost.pem wrong.example.com ca.pem ca.key wronghost_ext

# A key that matches no certificate.
ec_key other.key

rm -f ext.cnf
chmod 0644 ./*.pem ./*.key
# ca.pem last: its presence marks a complete set.
for f in *; do
    [[ "$f" == ca.pem ]] || mv -f "$f" "$dir/$f"
done
mv -f ca.pem "$dir/ca.pem"
