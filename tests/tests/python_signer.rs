//! Property test: vcnpath's request signer and the official OCI Python SDK (`oci.signer.Signer`
//! and `SecurityTokenSigner`) produce the same signature and signed-header list for a few
//! hundred random requests. Offline: the SDK only signs, nothing is sent.
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use reqwest::header::HeaderMap;
use reqwest::{Method, Url};
use rsa::RsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
use vcnpath::oci::signer::{HostHeader, RequestSigner};
use vcnpath_tests::ocikit::python;

const CASES: usize = 300;
/// Characters that exercise percent-encoding: reserved, unreserved, space, non-ASCII.
const ALPHABET: &[&str] = &[
    "a", "Z", "0", "-", "_", ".", "~", " ", "+", "&", "=", "?", "/", "%", ":", "@", "*", "!", "'",
    "(", ")", "é", "🦀", "\"", "#", ",", ";", "$",
];

fn random_text(rng: &mut StdRng, max: usize) -> String {
    let len = rng.gen_range(1..=max);
    (0..len)
        .map(|_| *ALPHABET.choose(rng).expect("non-empty"))
        .collect()
}

fn param<'a>(authorization: &'a str, name: &str) -> &'a str {
    let start = authorization
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {authorization}"))
        + name.len()
        + 2;
    let len = authorization[start..].find('"').expect("closing quote");
    &authorization[start..start + len]
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "generate, sign twice, compare: one story"
)]
fn signatures_match_the_official_python_sdk() {
    let python = match python() {
        Ok(p) => p,
        Err(reason) => {
            println!("skipping: {reason}");
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(0x0c1_5167);
    let key = RsaPrivateKey::new(&mut rng, 2048).expect("key");
    let key_pem = key.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string();
    let api_key_id = "ocid1.tenancy.oc1..aaaa/ocid1.user.oc1..bbbb/12:34:56:78:9a:bc:de:f0:12:34:56:78:9a:bc:de:f0";
    let token = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjE3MDAwMDAwMDB9.c2lnbmF0dXJl";
    let date = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let date_text = httpdate::fmt_http_date(date);
    let methods = [
        Method::GET,
        Method::DELETE,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
    ];
    let hosts = [
        "https://iaas.us-ashburn-1.oraclecloud.com",
        "http://127.0.0.1:8787",
        "https://iaas.eu-frankfurt-1.oraclecloud.com:443",
    ];

    let mut ours = Vec::new();
    let mut input = String::new();
    for i in 0..CASES {
        let method = methods.choose(&mut rng).expect("methods").clone();
        let mut url = Url::parse(hosts.choose(&mut rng).expect("hosts")).expect("base");
        {
            let mut segments = url.path_segments_mut().expect("http URL");
            segments.push("20160918");
            for _ in 0..rng.gen_range(1..4) {
                segments.push(&random_text(&mut rng, 8));
            }
        }
        if rng.gen_bool(0.7) {
            let mut pairs = url.query_pairs_mut();
            for _ in 0..rng.gen_range(1..5) {
                pairs.append_pair(&random_text(&mut rng, 6), &random_text(&mut rng, 12));
            }
        }
        let body = vcnpath::oci::signer::signs_body(&method).then(|| {
            if rng.gen_bool(0.2) {
                String::new()
            } else {
                format!(
                    "{{\"v\":\"{}\"}}",
                    random_text(&mut rng, 40).replace('"', "'")
                )
            }
        });
        let session = i % 2 == 1;
        let key_id = if session {
            format!("ST${token}")
        } else {
            api_key_id.to_owned()
        };
        let signer = RequestSigner::new(key_id, key.clone(), HostHeader::Signed);
        let mut headers = HeaderMap::new();
        signer.sign_at(
            &method,
            &url,
            &mut headers,
            body.as_deref().unwrap_or("").as_bytes(),
            date,
        );
        let mut case = serde_json::json!({
            "method": method.as_str(), "url": url.as_str(), "body": body, "date": date_text, "key_pem": key_pem,
        });
        if session {
            case["token"] = token.into();
        } else {
            case["key_id"] = api_key_id.into();
        }
        input.push_str(&case.to_string());
        input.push('\n');
        ours.push((case, headers));
    }

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sign_requests.py");
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    // Write from another thread: the script answers line by line, and a full stdout pipe
    // would otherwise block it while we block writing its stdin.
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("python finishes");
    // Check the script's status first: its traceback (on stderr) explains a broken pipe.
    assert!(
        output.status.success(),
        "sign_requests.py failed: {}",
        output.status
    );
    writer.join().expect("writer thread").expect("write cases");
    let theirs: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(theirs.len(), CASES, "the SDK signed every case");

    for ((case, headers), sdk) in ours.iter().zip(&theirs) {
        let our_auth = headers["authorization"].to_str().expect("ascii");
        let sdk_auth = sdk["authorization"].as_str().expect("authorization");
        for name in ["headers", "keyId", "signature"] {
            assert_eq!(
                param(our_auth, name),
                param(sdk_auth, name),
                "{name} differs for {case}"
            );
        }
        if let Some(len) = sdk["content_length"].as_str() {
            assert_eq!(headers["content-length"], len, "content-length for {case}");
            assert_eq!(
                headers["x-content-sha256"],
                sdk["x_content_sha256"].as_str().unwrap_or(""),
                "digest for {case}"
            );
        }
    }
}
