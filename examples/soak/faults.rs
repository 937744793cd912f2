//! The fault injector: relay-side faults (replies, stalls, drops, cuts, refusals, black holes,
//! slowness) and broker-side ones (cuts, black holes, the broker down) with the worker restarts,
//! each on its own seeded schedule.

use std::time::{Duration, Instant};

use testkit::smtp::{Action, Cmd, Rule};
use tokio_util::sync::CancellationToken;

use crate::rng::Rng;
use crate::{HEARTBEAT_SECS, REJECT_DOMAIN, Soak, hold, lock};

/// One injected fault, for the timeline.
pub(crate) struct FaultRecord {
    pub(crate) at: f64,
    pub(crate) kind: &'static str,
    pub(crate) detail: String,
}

impl Soak {
    /// The relay's standing rules: the permanent jobs are refused with 550, at RCPT and (should
    /// one slip through while the rules are being swapped) again after the message.
    pub(crate) fn reset_relay_rules(&self) {
        self.smtp.clear_rules();
        self.smtp.add_rule(
            Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into()))
                .matching(format!("@{REJECT_DOMAIN}")),
        );
        self.smtp.add_rule(
            Rule::always(
                Cmd::DataEnd,
                Action::Reply(554, "5.7.1 recipient refused".into()),
            )
            .matching(format!("@{REJECT_DOMAIN}")),
        );
    }

    pub(crate) async fn clear_all_faults(&self) {
        self.reset_relay_rules();
        self.smtp.set_data_delay(Duration::ZERO);
        self.smtp.set_refusing(false).await;
        self.relay_proxy.set_blackhole(false);
        self.relay_proxy.set_refusing(false).await;
        self.broker_proxy.set_blackhole(false);
        self.broker_proxy.set_refusing(false).await;
    }

    /// Relay-side faults, one after the other, until `stop`.
    pub(crate) async fn relay_faults(&self, mut rng: Rng, stop: CancellationToken) {
        let gap = self.args.fault_gap;
        #[derive(Clone, Copy)]
        enum F {
            Reply4xx,
            Stall,
            Drop,
            Cut,
            Refuse,
            Blackhole,
            Slow,
        }
        let weights: Vec<(F, u32)> = [
            (F::Reply4xx, 3, "relay_4xx"),
            (F::Stall, 2, "relay_stall"),
            (F::Drop, 2, "relay_drop"),
            (F::Cut, 3, "relay_cut"),
            (F::Refuse, 2, "relay_refuse"),
            (F::Blackhole, 1, "relay_blackhole"),
            (F::Slow, 1, "relay_slow"),
        ]
        .into_iter()
        .filter(|(_, _, kind)| self.allowed(kind))
        .map(|(f, w, _)| (f, w))
        .collect();
        if weights.is_empty() {
            return;
        }
        while hold(rng.secs(gap * 0.5, gap * 1.5), &stop).await {
            match rng.pick(&weights) {
                F::Reply4xx => {
                    let (cmd, code, text) = [
                        (Cmd::Mail, 451, "4.3.0 try again later"),
                        (Cmd::Rcpt, 450, "4.2.1 mailbox busy"),
                        (Cmd::DataEnd, 451, "4.3.0 queue full"),
                        (Cmd::Connect, 421, "4.3.2 service not available"),
                    ][rng.below(4)];
                    let d = rng.secs(3.0, 15.0);
                    self.fault(
                        "relay_4xx",
                        format!("{code} at {cmd:?} for {:.1} s", d.as_secs_f64()),
                    );
                    self.smtp
                        .add_rule(Rule::always(cmd, Action::Reply(code, text.into())));
                    hold(d, &stop).await;
                    self.reset_relay_rules();
                }
                F::Stall => {
                    let cmd = if rng.chance(0.7) {
                        Cmd::DataEnd
                    } else {
                        Cmd::Connect
                    };
                    let d = rng.secs(3.0, 12.0);
                    let at = if cmd == Cmd::DataEnd {
                        "after DATA"
                    } else {
                        "before the greeting"
                    };
                    self.fault(
                        "relay_stall",
                        format!("no answer {at} for {:.1} s", d.as_secs_f64()),
                    );
                    self.smtp.add_rule(Rule::always(cmd, Action::Stall));
                    hold(d, &stop).await;
                    self.reset_relay_rules();
                }
                F::Drop => {
                    let cmd =
                        [Cmd::Connect, Cmd::Mail, Cmd::Rcpt, Cmd::Data, Cmd::DataEnd][rng.below(5)];
                    let d = rng.secs(2.0, 10.0);
                    self.fault(
                        "relay_drop",
                        format!("connection closed at {cmd:?} for {:.1} s", d.as_secs_f64()),
                    );
                    self.smtp.add_rule(Rule::always(cmd, Action::Drop));
                    hold(d, &stop).await;
                    self.reset_relay_rules();
                }
                F::Cut => {
                    let times = 1 + rng.below(3);
                    self.fault("relay_cut", format!("every relay connection cut, {times}x"));
                    for _ in 0..times {
                        self.relay_proxy.cut_all();
                        tokio::time::sleep(rng.secs(0.1, 1.0)).await;
                    }
                }
                F::Refuse => {
                    let d = rng.secs(2.0, 15.0);
                    if rng.chance(0.5) {
                        self.fault(
                            "relay_refuse",
                            format!("connections refused for {:.1} s", d.as_secs_f64()),
                        );
                        self.relay_proxy.set_refusing(true).await;
                        self.relay_proxy.cut_all();
                        hold(d, &stop).await;
                        self.relay_proxy.set_refusing(false).await;
                    } else {
                        self.fault(
                            "relay_refuse",
                            format!(
                                "relay down behind its proxy (accepted, then closed) for {:.1} s",
                                d.as_secs_f64()
                            ),
                        );
                        self.smtp.set_refusing(true).await;
                        self.smtp.kill_sessions();
                        hold(d, &stop).await;
                        self.smtp.set_refusing(false).await;
                    }
                }
                F::Blackhole => {
                    let d = rng.secs(2.0, 8.0);
                    self.fault(
                        "relay_blackhole",
                        format!("relay traffic black-holed for {:.1} s", d.as_secs_f64()),
                    );
                    self.relay_proxy.set_blackhole(true);
                    hold(d, &stop).await;
                    self.relay_proxy.set_blackhole(false);
                    self.relay_proxy.cut_all();
                }
                F::Slow => {
                    let delay = rng.secs(0.3, 1.5);
                    let d = rng.secs(5.0, 20.0);
                    self.fault(
                        "relay_slow",
                        format!(
                            "{:.0} ms before each 250 after DATA, for {:.1} s",
                            delay.as_secs_f64() * 1000.0,
                            d.as_secs_f64()
                        ),
                    );
                    self.smtp.set_data_delay(delay);
                    hold(d, &stop).await;
                    self.smtp.set_data_delay(Duration::ZERO);
                }
            }
        }
    }

    /// Broker-side faults and restarts, one after the other, until `stop`.
    pub(crate) async fn broker_faults(&self, mut rng: Rng, stop: CancellationToken) {
        let gap = self.args.fault_gap;
        let run = self.args.minutes * 60.0;
        let count = self
            .args
            .restarts
            .unwrap_or_else(|| ((self.args.minutes / 2.5).round() as usize).max(2));
        let mut restarts: Vec<f64> = (0..count)
            .map(|i| {
                if i % 2 == 0 {
                    rng.range(0.05, 0.25) * run
                } else {
                    rng.range(0.75, 0.95) * run
                }
            })
            .collect();
        restarts.sort_by(|a, b| b.total_cmp(a)); // the next one last
        #[derive(Clone, Copy)]
        enum F {
            Cut,
            Blackhole,
            Down,
        }
        loop {
            let mut pause = rng.secs(gap * 0.5, gap * 1.5);
            if let Some(next) = restarts.last() {
                pause = pause.min(Duration::from_secs_f64((next - self.now()).max(0.0)));
            }
            if !hold(pause, &stop).await {
                break;
            }
            if restarts.last().is_some_and(|next| self.now() >= *next) {
                restarts.pop();
                let double = rng.chance(self.args.double_sigterm);
                let pause = rng.secs(0.0, 3.0);
                self.restart(double, pause).await;
                continue;
            }
            let Some((_, _, http)) = self.current() else {
                continue;
            };
            let weights: Vec<(F, u32)> = [
                (F::Cut, 3, "broker_cut"),
                (F::Blackhole, 2, "broker_blackhole"),
                (F::Down, 2, "broker_down"),
            ]
            .into_iter()
            .filter(|(_, _, kind)| self.allowed(kind))
            .map(|(f, w, _)| (f, w))
            .collect();
            if weights.is_empty() {
                continue;
            }
            let what = match rng.pick(&weights) {
                F::Cut => {
                    self.fault("broker_cut", "every broker connection cut");
                    self.broker_proxy.cut_all();
                    "broker_cut"
                }
                F::Blackhole => {
                    let d = rng.secs(5.0, 12.0);
                    self.fault(
                        "broker_blackhole",
                        format!("broker traffic black-holed for {:.1} s", d.as_secs_f64()),
                    );
                    self.broker_proxy.set_blackhole(true);
                    let since = Instant::now();
                    let mut noticed = None;
                    while since.elapsed() < d && !stop.is_cancelled() {
                        if noticed.is_none()
                            && let Err(e) = amqp_mailer::http::check(http, "/readyz").await
                            && e.contains("reconnecting")
                        {
                            noticed = Some(since.elapsed().as_secs_f64());
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let held = since.elapsed().as_secs_f64();
                    self.broker_proxy.set_blackhole(false);
                    self.broker_proxy.cut_all();
                    lock(&self.blackholes).push((held, noticed));
                    if noticed.is_none() && held > (2 * HEARTBEAT_SECS + 3) as f64 {
                        self.note(format!(
                            "the worker did not report the broker black-hole within {held:.1} s \
                             (heartbeat {HEARTBEAT_SECS} s)"
                        ));
                    }
                    "broker_blackhole"
                }
                F::Down => {
                    let d = rng.secs(2.0, 10.0);
                    self.fault(
                        "broker_down",
                        format!("broker unreachable (refused) for {:.1} s", d.as_secs_f64()),
                    );
                    self.broker_proxy.set_refusing(true).await;
                    self.broker_proxy.cut_all();
                    hold(d, &stop).await;
                    self.broker_proxy.set_refusing(false).await;
                    "broker_down"
                }
            };
            // It must come back to consuming on its own.
            match self.wait_ready(http, Duration::from_secs(60)).await {
                Some(after) => lock(&self.recoveries).push(after),
                None => {
                    if self.current().is_some_and(|(_, _, h)| h == http) {
                        self.problem(format!(
                            "the worker was not consuming again within 60 s after {what}"
                        ));
                    }
                }
            }
        }
    }
}
