//! Fan-out at scale (`tests/common/fanout.rs`): SSE and WebSocket clients by the ten thousand on
//! one channel, fed by Mosquitto at 100 msg/s; every client must receive every message once, in
//! order, and the daemon must count each of them as a subscriber.
//!
//! 10,000 SSE and 9,500 WebSocket clients at once: every connection is a descriptor in the
//! daemon and in this process, and this machine's hard limit is 20,000 per process (it cannot
//! be raised without CAP_SYS_RESOURCE). 10,000 of each, one kind at a time, and the figures per
//! connection are `examples/load_fanout.rs` runs (README, "Fan-out").

mod common;

use std::time::Duration;

use common::fanout::{FanoutPlan, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sse_and_nine_and_a_half_thousand_websocket_clients_each_receive_every_message()
 {
    let report = run(FanoutPlan {
        sse_clients: 10_000,
        ws_clients: 9_500,
        rate: 100,
        messages: 300,
        deadline: Duration::from_secs(300),
    })
    .await
    .expect("the scenario runs");
    println!("{report}");
    assert_eq!(report.out_of_order, 0, "{report}");
    assert_eq!(report.sse_complete, 10_000, "{report}");
    assert_eq!(report.ws_complete, 9_500, "{report}");
}
