//! `bench-baseline`: the minimal axum server `cargo xtask bench` compares the agent's HTTP
//! endpoint with. Same stack as the agent (axum 0.8, hyper 1 HTTP/1.1, a multi-threaded tokio
//! runtime with two workers), no middleware, no limits, no per-request work: each route answers
//! a constant body read once at start (the bench passes the agent's own `/readyz` and `/status`
//! answers, so both servers send the same bytes).
//!
//! usage: bench-baseline ADDR [PATH=FILE]...     e.g. bench-baseline 127.0.0.1:9741 /readyz=readyz.json
//!
//! Built only with `--features bench-baseline` (`cargo xtask bench` builds it in release).

use axum::http::header;
use axum::routing::get;
use axum::Router;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9741".to_string());
    let mut app = Router::new();
    let mut routes = 0;
    for arg in args {
        let Some((path, file)) = arg.split_once('=') else {
            eprintln!("bench-baseline: expected PATH=FILE, got {arg:?}");
            std::process::exit(2);
        };
        let body: &'static [u8] = match std::fs::read(file) {
            Ok(bytes) => Box::leak(bytes.into_boxed_slice()),
            Err(e) => {
                eprintln!("bench-baseline: cannot read {file}: {e}");
                std::process::exit(2);
            }
        };
        app =
            app.route(path, get(move || async move { ([(header::CONTENT_TYPE, "application/json")], body) }));
        routes += 1;
    }
    if routes == 0 {
        app = app.route("/", get(|| async { "ok\n" }));
    }
    // The agent's runtime: two worker threads (src/main.rs).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bench-baseline: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        println!("listening on {addr}");
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("bench-baseline: {e}");
            std::process::exit(1);
        }
    });
}
