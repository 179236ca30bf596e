//! Bad requests get clear gRPC errors, and the daemon keeps serving.

use strata_fs_tests::daemon::{Daemon, Snap};
use strata_fs_tests::require_root;
use tonic::{Code, Status};

fn expect(result: Result<impl std::fmt::Debug, Status>, code: Code, mentions: &str) {
    let err = result.expect_err("request should be refused");
    assert_eq!(err.code(), code, "{err}");
    assert!(
        err.message().contains(mentions),
        "{:?} should mention {mentions:?}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_the_daemon_keeps_serving() {
    require_root();
    let d = Daemon::start();
    let mut s = Snap::new(&d).await;
    s.prepare("active", "").await;
    s.prepare("tmp", "").await;
    s.commit("committed", "tmp").await;

    expect(s.try_stat("unknown").await, Code::NotFound, "unknown");
    expect(s.try_mounts("unknown").await, Code::NotFound, "unknown");
    expect(s.try_remove("unknown").await, Code::NotFound, "unknown");
    expect(s.try_usage("unknown").await, Code::NotFound, "unknown");
    expect(
        s.try_commit("x", "unknown").await,
        Code::NotFound,
        "unknown",
    );
    expect(
        s.try_prepare("child", "unknown").await,
        Code::NotFound,
        "unknown",
    );

    expect(s.try_prepare("", "").await, Code::InvalidArgument, "empty");
    expect(s.try_stat("").await, Code::InvalidArgument, "empty");
    expect(
        s.try_commit("", "active").await,
        Code::InvalidArgument,
        "empty",
    );

    expect(
        s.try_prepare("child", "active").await,
        Code::InvalidArgument,
        "commit it first",
    );
    expect(
        s.try_commit("committed", "active").await,
        Code::AlreadyExists,
        "committed",
    );
    expect(
        s.try_commit("again", "committed").await,
        Code::FailedPrecondition,
        "not active",
    );
    expect(
        s.try_mounts("committed").await,
        Code::FailedPrecondition,
        "view",
    );

    expect(
        s.try_list(&["kind=="]).await,
        Code::InvalidArgument,
        "invalid filter",
    );
    expect(
        s.try_list(&["kind=committed"]).await,
        Code::InvalidArgument,
        "operator",
    );
    expect(
        s.try_list(&["labels.\"open"]).await,
        Code::InvalidArgument,
        "unterminated",
    );

    let mut info = s.stat("committed").await;
    info.parent = "other".into();
    expect(
        s.try_update(info.clone(), &["parent"]).await,
        Code::InvalidArgument,
        "parent",
    );
    expect(
        s.try_update(info, &["labels", "size"]).await,
        Code::InvalidArgument,
        "size",
    );
    assert_eq!(
        s.stat("committed").await.parent,
        "",
        "a refused update changes nothing"
    );

    // Still serving, state intact.
    assert_eq!(s.names(&[]).await, ["active", "committed"]);
    s.prepare("after", "committed").await;
}
