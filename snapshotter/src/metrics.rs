//! The metrics endpoint (`[lazy] metrics_address`): `GET /metrics` answers the lazy layers'
//! counters in Prometheus' text format, over HTTP/1.1 served by hyper.

use std::convert::Infallible;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::header::CONTENT_TYPE;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, StatusCode};

use crate::lazy::remote::Lazy;
use crate::lazy::{layer_stats, StatsSnapshot};

/// Binds the endpoint now, so that a bad or taken address fails the start.
pub fn bind(address: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the endpoint on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, root: PathBuf, lazy: Arc<Lazy>) -> hyper::Result<()> {
    let make = make_service_fn(move |_| {
        let (root, lazy) = (root.clone(), lazy.clone());
        async move {
            Ok::<_, Infallible>(service_fn(move |req| {
                respond(req, root.clone(), lazy.clone())
            }))
        }
    });
    hyper::Server::from_tcp(listener)?.serve(make).await
}

async fn respond(
    req: Request<Body>,
    root: PathBuf,
    lazy: Arc<Lazy>,
) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return Ok(reply(StatusCode::NOT_FOUND, "try GET /metrics\n".into()));
    }
    // Reading every layer's counters touches the disk: not on the thread serving containerd.
    let fell_back = lazy.fell_back.load(Ordering::Relaxed);
    let text = tokio::task::spawn_blocking(move || prometheus(&root, fell_back)).await;
    Ok(match text {
        Ok(text) => reply(StatusCode::OK, text),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    })
}

fn reply(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let text = hyper::header::HeaderValue::from_static("text/plain; version=0.0.4");
    r.headers_mut().insert(CONTENT_TYPE, text);
    r
}

/// The counters in Prometheus' text format.
pub fn prometheus(root: &Path, fell_back: u64) -> String {
    let layers = layer_stats(root);
    let mut out = String::new();
    type Metric = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);
    let metrics: [Metric; 6] = [
        (
            "strata_lazy_layer_bytes",
            "Compressed size of the layer blob",
            |s| s.total_bytes,
        ),
        (
            "strata_lazy_fetched_bytes_total",
            "Compressed bytes fetched from the registry",
            |s| s.fetched_bytes,
        ),
        (
            "strata_lazy_cache_hits_total",
            "Chunks and whole-file reads served from the cache",
            |s| s.cache_hits,
        ),
        (
            "strata_lazy_verify_failures_total",
            "Chunks whose sha256 did not match (never served)",
            |s| s.verify_failures,
        ),
        (
            "strata_lazy_fetch_errors_total",
            "Chunk fetches that failed",
            |s| s.fetch_errors,
        ),
        (
            "strata_lazy_passthrough_opens_total",
            "Opens passed through to a whole cached file (FUSE passthrough)",
            |s| s.passthrough_opens,
        ),
    ];
    for (name, help, get) in metrics {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {}\n",
            if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            }
        ));
        for (digest, s) in &layers {
            if let Ok(s) = s {
                out.push_str(&format!("{name}{{layer=\"{digest}\"}} {}\n", get(s)));
            }
        }
    }
    out.push_str("# HELP strata_lazy_stats_unreadable Layers whose counters cannot be read (see status)\n# TYPE strata_lazy_stats_unreadable gauge\n");
    for (digest, s) in &layers {
        out.push_str(&format!(
            "strata_lazy_stats_unreadable{{layer=\"{digest}\"}} {}\n",
            u8::from(s.is_err())
        ));
    }
    out.push_str(&format!(
        "# HELP strata_lazy_fallback_layers_total Layers that were neither zstd:chunked nor eStargz and were pulled whole\n# TYPE strata_lazy_fallback_layers_total counter\nstrata_lazy_fallback_layers_total {fell_back}\n"
    ));
    out
}
