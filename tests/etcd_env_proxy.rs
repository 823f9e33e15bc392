//! A proxy named by the environment (ALL_PROXY, HTTP_PROXY, …) is never used
//! for etcd's lock traffic: the requests go to the members given. (Its own
//! process: it sets the environment.)

mod common;

use std::time::Duration;

use common::etcd_server::etcd_url;
use common::unique;
use lockbox::LockClient;

#[test]
fn an_environment_proxy_is_not_used() {
    // Started before the environment names the proxy (the harness talks to
    // the member directly too).
    let url = etcd_url();
    // Nothing listens there: a request sent through it fails.
    for var in ["ALL_PROXY", "HTTP_PROXY", "http_proxy", "all_proxy"] {
        // SAFETY: set before any thread of this test reads the environment
        // for a request, and this test is its process's only one.
        unsafe { std::env::set_var(var, "http://127.0.0.1:9") };
    }
    let client = LockClient::etcd(&url)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("build() reaches the member, not the proxy");
    let lock = client.try_lock(&unique("env-proxy")).unwrap().unwrap();
    assert!(lock.fencing_token() > 0);
    lock.release().unwrap();
}
