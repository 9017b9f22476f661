//! The echo backend, driven in-process on 127.0.0.1 with real clients: hyper (HTTP/1.1 and h2c
//! prior knowledge), a hand-written WebSocket client, and the tonic-generated gRPC client.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use waypoint_testbed::echo::{
    EchoConfig, EchoServer,
    pb::{EchoRequest, echo_service_client::EchoServiceClient},
};

type TestBody = BoxBody<Bytes, std::io::Error>;

/// Binds an echo server named `name` on 127.0.0.1:0 (HTTP and gRPC) and spawns it.
async fn start(name: &str) -> (SocketAddr, SocketAddr) {
    let server = EchoServer::bind(&EchoConfig {
        name: name.to_owned(),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: Some("127.0.0.1:0".parse().expect("addr")),
    })
    .await
    .expect("bind echo server");
    let addrs = (
        server.http_addr(),
        server.grpc_addr().expect("gRPC listener"),
    );
    tokio::spawn(server.run());
    addrs
}

fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(data: &'static [u8]) -> TestBody {
    Full::new(Bytes::from_static(data))
        .map_err(|never| match never {})
        .boxed()
}

/// An HTTP/1.1 connection; returns the sender and the client's local address.
async fn h1(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    SocketAddr,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let local = stream.local_addr().expect("local addr");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    (sender, local)
}

/// An h2c (prior knowledge) connection.
async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

async fn json(resp: Response<Incoming>) -> Value {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("JSON body")
}

#[tokio::test]
async fn http1_echoes_the_request_as_json() {
    let (http, _) = start("echo-a").await;
    let (mut sender, local) = h1(http).await;
    let req = Request::post("/hello/world?x=1&y=2")
        .header("host", "echo.test")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(full(b"hello world"))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["x-echo-server"], "echo-a");
    let v = json(resp).await;
    assert_eq!(v["server"], "echo-a");
    assert_eq!(v["listener"], http.to_string());
    assert_eq!(v["peer"], local.to_string());
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/hello/world?x=1&y=2");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["headers"]["host"], "echo.test");
    assert_eq!(v["headers"]["x-multi"], "a, b");
    assert_eq!(v["body_len"], 11);

    // Keep-alive: a second request on the same connection.
    let req = Request::get("/again")
        .header("host", "echo.test")
        .body(empty())
        .expect("request");
    let v = json(sender.send_request(req).await.expect("response")).await;
    assert_eq!(v["path"], "/again");
    assert_eq!(v["body_len"], 0);
}

#[tokio::test]
async fn h2c_prior_knowledge_works_on_the_same_port() {
    let (http, _) = start("echo-h2").await;
    let mut sender = h2(http).await;
    let req = Request::put(format!("http://{http}/h2?q=1"))
        .header("x-thing", "yes")
        .body(full(b"0123456789"))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let v = json(resp).await;
    assert_eq!(v["server"], "echo-h2");
    assert_eq!(v["protocol"], "HTTP/2");
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/h2?q=1");
    assert_eq!(v["headers"]["x-thing"], "yes");
    assert_eq!(v["body_len"], 10);
}

#[tokio::test]
async fn status_override_from_header_and_query() {
    let (http, _) = start("echo-status").await;
    let (mut sender, _) = h1(http).await;
    let req = Request::get("/fail")
        .header("host", "x")
        .header("x-echo-status", "503")
        .body(empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(resp).await["server"], "echo-status");

    let req = Request::get("/teapot?x-echo-status=418")
        .header("host", "x")
        .body(empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(json(resp).await["path"], "/teapot?x-echo-status=418");
}

#[tokio::test]
async fn malformed_controls_get_a_400_naming_the_header() {
    let (http, _) = start("echo-bad").await;
    let (mut sender, _) = h1(http).await;
    for (name, value) in [
        ("x-echo-delay-ms", "soon"),
        ("x-echo-status", "99"),
        ("x-echo-status", "abc"),
        ("x-echo-response-size", "-1"),
        ("x-echo-reset", "maybe"),
        ("x-echo-fail-first", "twice"),
    ] {
        let req = Request::get("/")
            .header("host", "x")
            .header(name, value)
            .body(empty())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{name}: {value}");
        let v = json(resp).await;
        assert_eq!(v["header"], name);
        assert!(v["error"].as_str().expect("error").contains(name), "{v}");
    }
}

#[tokio::test]
async fn delay_waits_before_answering() {
    let (http, _) = start("echo-delay").await;
    let (mut sender, _) = h1(http).await;
    let req = Request::get("/slow")
        .header("host", "x")
        .header("x-echo-delay-ms", "150")
        .body(empty())
        .expect("request");
    let started = tokio::time::Instant::now();
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

/// Reads a body to the end, counting it and checking the generated pattern (byte k is k % 256).
async fn count_pattern(resp: Response<Incoming>) -> u64 {
    let mut body = resp.into_body();
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.expect("frame").data_ref() {
            for (i, byte) in data.iter().enumerate() {
                assert_eq!(u64::from(*byte), (len + i as u64) % 256);
            }
            len += data.len() as u64;
        }
    }
    len
}

#[tokio::test]
async fn response_size_streams_generated_bytes() {
    const SIZE: u64 = 5 * 1024 * 1024;
    let (http, _) = start("echo-size").await;

    let (mut sender, _) = h1(http).await;
    let req = Request::get("/big")
        .header("host", "x")
        .header("x-echo-response-size", SIZE.to_string())
        .body(empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.headers()["content-length"], SIZE.to_string().as_str());
    assert_eq!(count_pattern(resp).await, SIZE);

    let mut sender = h2(http).await;
    let req = Request::get(format!("http://{http}/big?x-echo-response-size={SIZE}"))
        .body(empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(count_pattern(resp).await, SIZE);
}

#[tokio::test]
async fn request_body_is_streamed_and_counted() {
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 128; // 32 MiB
    let (http, _) = start("echo-upload").await;
    let (mut sender, _) = h1(http).await;
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    let frames = futures::stream::iter(
        (0..CHUNKS).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let req = Request::post("/upload")
        .header("host", "x")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("request");
    let v = json(sender.send_request(req).await.expect("response")).await;
    assert_eq!(v["body_len"], (CHUNK * CHUNKS) as u64);
    assert!(v["headers"]["transfer-encoding"].as_str().is_some());
}

#[tokio::test]
async fn reset_drops_the_connection_or_stream() {
    let (http, _) = start("echo-reset").await;

    let (mut sender, _) = h1(http).await;
    let req = Request::get("/")
        .header("host", "x")
        .header("x-echo-reset", "1")
        .body(empty())
        .expect("request");
    assert!(sender.send_request(req).await.is_err());

    // HTTP/2: only the stream is reset; the connection keeps working.
    let mut sender = h2(http).await;
    let req = Request::get(format!("http://{http}/?x-echo-reset=true"))
        .body(empty())
        .expect("request");
    assert!(sender.send_request(req).await.is_err());
    let req = Request::get(format!("http://{http}/after"))
        .body(empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(json(resp).await["path"], "/after");
}

#[tokio::test]
async fn fail_first_fails_the_first_n_requests_of_a_key_then_answers() {
    let (http, _) = start("echo-flaky").await;
    let mut sender = h2(http).await;
    let flaky = |key: &str, extra: Option<(&'static str, &'static str)>| {
        let mut req = Request::post(format!("http://{http}/flaky"))
            .header("x-echo-key", key)
            .header("x-echo-fail-first", "2");
        if let Some((name, value)) = extra {
            req = req.header(name, value);
        }
        req.body(full(b"payload")).expect("request")
    };
    // Default failure: 503, counted per key; then 200 with the JSON.
    for (want, count) in [(503, 1), (503, 2), (200, 3), (200, 4)] {
        let resp = sender
            .send_request(flaky("a", None))
            .await
            .expect("response");
        assert_eq!(resp.status().as_u16(), want, "request {count} of key a");
        assert_eq!(resp.headers()["x-echo-request-count"], count.to_string());
        let v = json(resp).await;
        assert_eq!(v["request_count"], count);
        assert_eq!(v["body_len"], 7);
    }
    // Another key has its own count; x-echo-status picks the failure status.
    let resp = sender
        .send_request(flaky("b", Some(("x-echo-status", "502"))))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["x-echo-request-count"], "1");
    // With x-echo-reset the failure is a reset stream.
    for _ in 0..2 {
        assert!(
            sender
                .send_request(flaky("c", Some(("x-echo-reset", "1"))))
                .await
                .is_err()
        );
    }
    let resp = sender
        .send_request(flaky("c", Some(("x-echo-reset", "1"))))
        .await
        .expect("third request of key c");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-echo-request-count"], "3");

    // Query form, key defaulting to the path; counts are shared by every connection.
    for (want, count) in [(503, 1), (200, 2)] {
        let (mut h1_sender, _) = h1(http).await;
        let req = Request::get("/by-path?x-echo-fail-first=1")
            .header("host", "x")
            .body(empty())
            .expect("request");
        let resp = h1_sender.send_request(req).await.expect("response");
        assert_eq!(resp.status().as_u16(), want);
        assert_eq!(resp.headers()["x-echo-request-count"], count.to_string());
    }
    // Without a key nothing is counted.
    let resp = sender
        .send_request(
            Request::get(format!("http://{http}/plain"))
                .body(empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert!(resp.headers().get("x-echo-request-count").is_none());
    assert!(json(resp).await.get("request_count").is_none());
}

#[tokio::test]
async fn body_sha1_reports_the_digest_of_the_streamed_body() {
    let (http, _) = start("echo-sha1").await;
    let (mut sender, _) = h1(http).await;
    let req = Request::post("/digest")
        .header("host", "x")
        .header("x-echo-body-sha1", "1")
        .body(full(b"abc"))
        .expect("request");
    let v = json(sender.send_request(req).await.expect("response")).await;
    // SHA-1("abc"), FIPS 180-2 appendix A.1.
    assert_eq!(v["body_sha1"], "a9993e364706816aba3e25717850c26c9cd0d89d");
    let req = Request::post("/digest")
        .header("host", "x")
        .body(full(b"abc"))
        .expect("request");
    let v = json(sender.send_request(req).await.expect("response")).await;
    assert!(v.get("body_sha1").is_none(), "{v}");
    let req = Request::post("/digest")
        .header("host", "x")
        .header("x-echo-body-sha1", "sometimes")
        .body(empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(resp).await["header"], "x-echo-body-sha1");
}

/// Writes one masked client frame.
async fn ws_send(stream: &mut TcpStream, first_byte: u8, payload: &[u8]) {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![first_byte];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&u16::try_from(n).expect("small frame").to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).await.expect("write frame");
}

/// Reads one unmasked server frame: (first byte, payload).
async fn ws_recv(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.expect("frame head");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => u64::from(stream.read_u16().await.expect("len")),
        127 => stream.read_u64().await.expect("len"),
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).expect("len")];
    stream.read_exact(&mut payload).await.expect("payload");
    (head[0], payload)
}

#[tokio::test]
async fn websocket_echo_round_trip() {
    let (http, _) = start("echo-ws").await;
    let mut stream = TcpStream::connect(http).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\n\
              Host: echo.test\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("write handshake");
    // Read the response head byte by byte so no frame bytes are swallowed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.expect("response head"));
    }
    let head = String::from_utf8(head)
        .expect("UTF-8 head")
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // The RFC 6455 example key and accept value.
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    ws_send(&mut stream, 0x81, b"hello websocket").await;
    assert_eq!(
        ws_recv(&mut stream).await,
        (0x81, b"hello websocket".to_vec())
    );

    let binary: Vec<u8> = (0..=255).cycle().take(1000).collect();
    ws_send(&mut stream, 0x82, &binary).await;
    assert_eq!(ws_recv(&mut stream).await, (0x82, binary));

    ws_send(&mut stream, 0x89, b"ping!").await;
    assert_eq!(ws_recv(&mut stream).await, (0x8A, b"ping!".to_vec()));

    ws_send(&mut stream, 0x88, &1000u16.to_be_bytes()).await;
    assert_eq!(
        ws_recv(&mut stream).await,
        (0x88, 1000u16.to_be_bytes().to_vec())
    );
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .expect("EOF after close");
    assert!(rest.is_empty());
}

async fn grpc_client(addr: SocketAddr) -> EchoServiceClient<tonic::transport::Channel> {
    EchoServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC connect")
}

#[tokio::test]
async fn grpc_unary_echoes_message_and_metadata_keys() {
    let (_, grpc) = start("echo-grpc").await;
    let mut client = grpc_client(grpc).await;
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi there".to_owned(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-test-key", "v".parse().expect("metadata value"));
    let reply = client.echo(req).await.expect("echo").into_inner();
    assert_eq!(reply.server, "echo-grpc");
    assert_eq!(reply.message, "hi there");
    assert_eq!(reply.sequence, 0);
    assert!(
        reply.metadata_keys.iter().any(|k| k == "x-test-key"),
        "{:?}",
        reply.metadata_keys
    );
    assert!(reply.peer.starts_with("127.0.0.1:"), "{}", reply.peer);
}

#[tokio::test]
async fn grpc_error_status_and_validation() {
    let (_, grpc) = start("echo-grpc-err").await;
    let mut client = grpc_client(grpc).await;
    let status = client
        .echo(EchoRequest {
            message: "x".to_owned(),
            status_code: Code::NotFound as i32,
            status_message: "no such thing".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("must fail");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such thing");

    let status = client
        .echo(EchoRequest {
            status_code: 99,
            ..Default::default()
        })
        .await
        .expect_err("must fail");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Server streaming: the replies, then the failure.
    let mut stream = client
        .echo_stream(EchoRequest {
            message: "s".to_owned(),
            reply_count: 3,
            status_code: Code::Unavailable as i32,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    for seq in 0..3 {
        let reply = stream.message().await.expect("reply").expect("not ended");
        assert_eq!(reply.sequence, seq);
        assert_eq!(reply.message, "s");
    }
    let status = stream.message().await.expect_err("the failure");
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn grpc_server_streaming_sends_reply_count_replies() {
    let (_, grpc) = start("echo-grpc-stream").await;
    let mut client = grpc_client(grpc).await;
    let replies: Vec<_> = client
        .echo_stream(EchoRequest {
            message: "many".to_owned(),
            reply_count: 5,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner()
        .collect()
        .await;
    assert_eq!(replies.len(), 5);
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.expect("reply");
        assert_eq!(reply.sequence as usize, i);
        assert_eq!(reply.server, "echo-grpc-stream");
    }
}

#[tokio::test]
async fn grpc_bidi_echoes_each_message_as_it_arrives() {
    let (_, grpc) = start("echo-bidi").await;
    let mut client = grpc_client(grpc).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .echo_bidi(ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    // Each reply arrives before the next request is sent: echoes are not batched.
    for (seq, message) in ["one", "two", "three"].into_iter().enumerate() {
        tx.send(EchoRequest {
            message: message.to_owned(),
            ..Default::default()
        })
        .await
        .expect("send");
        let reply = replies.message().await.expect("reply").expect("not ended");
        assert_eq!(reply.message, message);
        assert_eq!(reply.sequence as usize, seq);
        assert_eq!(reply.server, "echo-bidi");
    }
    // A failing request ends the call with its status.
    tx.send(EchoRequest {
        status_code: Code::PermissionDenied as i32,
        ..Default::default()
    })
    .await
    .expect("send");
    let status = replies.message().await.expect_err("the failure");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn grpc_bidi_ends_cleanly_when_the_client_does() {
    let (_, grpc) = start("echo-bidi-end").await;
    let mut client = grpc_client(grpc).await;
    let requests = futures::stream::iter((0..10).map(|i| EchoRequest {
        message: format!("m{i}"),
        ..Default::default()
    }));
    let replies: Vec<_> = client
        .echo_bidi(requests)
        .await
        .expect("bidi")
        .into_inner()
        .map(|r| r.expect("reply").message)
        .collect()
        .await;
    let expected: Vec<_> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(replies, expected);
}

#[tokio::test]
async fn websocket_oversized_frame_closes_with_1009() {
    let (http, _) = start("echo-ws-big").await;
    let mut stream = TcpStream::connect(http).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("write handshake");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.expect("response head"));
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // Only the header of a 2 MiB binary frame: the server must refuse it without reading on.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(2u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    stream.write_all(&frame).await.expect("write frame head");
    assert_eq!(
        ws_recv(&mut stream).await,
        (0x88, 1009u16.to_be_bytes().to_vec())
    );
}

#[tokio::test]
async fn websocket_handshake_without_key_is_rejected() {
    let (http, _) = start("echo-ws-bad").await;
    let (mut sender, _) = h1(http).await;
    let req = Request::get("/ws")
        .header("host", "x")
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-version", "13")
        .body(empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(resp).await["header"], "sec-websocket-key");
}

#[tokio::test]
async fn the_binary_prints_its_ready_line_and_serves() {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_echo-server"))
        .args([
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--name",
            "from-cli",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn echo-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("ready line");
    let rest = line
        .trim_end()
        .strip_prefix("echo-server ready http=")
        .expect("ready line format");
    let (http, grpc) = rest.split_once(" grpc=").expect("grpc= part");
    let http: SocketAddr = http.parse().expect("http addr");
    let grpc: SocketAddr = grpc.parse().expect("grpc addr");
    assert_ne!(http.port(), 0);
    assert_ne!(grpc.port(), 0);

    let (mut sender, _) = h1(http).await;
    let req = Request::get("/")
        .header("host", "x")
        .body(empty())
        .expect("request");
    let v = json(sender.send_request(req).await.expect("response")).await;
    assert_eq!(v["server"], "from-cli");
    let reply = grpc_client(grpc)
        .await
        .echo(EchoRequest {
            message: "cli".to_owned(),
            ..Default::default()
        })
        .await
        .expect("echo")
        .into_inner();
    assert_eq!(reply.server, "from-cli");

    child.kill().await.expect("kill echo-server");
}
