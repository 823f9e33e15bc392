//! Most of the integration tests, as one test binary: each module is what was
//! once a binary of its own (`tests/<name>.rs`). One binary compiles and links
//! the shared harness once instead of once per file, and its tests share the
//! servers the harness starts (etcd members, TLS servers) and one pool of test
//! threads. Tests that need a process of their own stay in `tests/*.rs`: those
//! that re-run their binary as child processes, install a process-wide logger
//! or hook (a metrics recorder, rustls' default crypto provider), fork, set
//! environment variables, count the process's threads by name, or lock the
//! shared default lease table. A module added here must be safe beside every
//! other: its tests run in one process with them, in parallel.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod cleanup;
mod etcd_cluster;
mod etcd_conformance;
mod etcd_semantics;
mod etcd_tls;
mod events;
mod faults;
mod force_release;
mod health;
mod inspect;
mod lock_delay;
mod loss;
mod memory_store;
mod metrics;
mod partition;
mod pg_conformance_tls;
mod pg_fence;
mod pg_history;
mod pg_hostile_settings;
mod pg_inspect;
mod pg_keys;
mod pg_late_cancel;
mod pg_lock_table;
mod pg_multiplex;
mod pg_reclaim;
mod pg_renew_bound;
mod pg_shared;
mod pg_shared_hostile;
mod pg_snapshot;
mod pg_table;
mod pg_table_lock;
mod pg_tls;
mod pg_unlogged;
mod pg_unlogged_epoch_waits;
mod pg_wait_first;
mod pg_wait_grant;
mod pgbouncer;
mod privilege;
mod redis_acl;
mod redis_batch_renewal;
mod redis_conformance_tls;
mod redis_data_loss;
mod redis_faults;
mod redis_lanes;
mod redis_listener;
mod redis_socket;
mod redis_state;
mod redis_timeouts;
mod redis_tls;
mod renewal;
mod restart;
mod review_attack_grant_deadline;
mod review_attack_reclaim_race;
mod review_attack_try_zombie;
mod review_core_interrupt;
mod review_etcd_foreign_keys;
mod review_etcd_give_up;
mod review_etcd_hostile_answers;
mod review_etcd_network;
mod review_etcd_operator;
mod review_etcd_waiter_failover;
mod review_fence_after_renewals;
mod review_fence_ddl_queue;
mod review_fence_function_snapshot;
mod review_fence_savepoint;
mod review_fence_stale_snapshot;
mod review_fence_wait_grant_version;
mod review_fence_wrong_database;
mod review_hist_ddl;
mod review_hist_long_name;
mod review_hist_operator_shadow;
mod review_hist_order;
mod review_hist_partitioned;
mod review_hist_privileges;
mod review_hist_release_race;
mod review_hist_table_shape;
mod review_hist_zombie_pid;
mod review_mux2_aborted_tx;
mod review_mux3_wait_first;
mod review_mux_release_row;
mod review_mux_shadow_unnest;
mod review_mux_stale_key;
mod review_pg_concat_shadow;
mod review_pg_coord_fence;
mod review_pg_coord_force_nocoord;
mod review_pg_coord_renew_race;
mod review_pg_infinity;
mod review_pg_jit;
mod review_pg_operator_shadow;
mod review_pg_row_held;
mod review_pg_row_held_wait;
mod review_pg_row_wait_takeover;
mod review_pg_stale_slice;
mod review_pg_stranded_key;
mod review_pg_table_trigger;
mod review_pg_wait_table_lock;
mod review_pg_waited_shadow;
mod review_pgtls_at_in_host;
mod review_redis_coord_leases;
mod review_redis_hello_secret;
mod review_redis_unix_connect_timeout;
mod review_release_lost_signal;
mod review_release_renewed_lease;
mod review_unlogged_companion_trigger;
mod review_unlogged_crash_stress;
mod review_unlogged_partitions;
mod review_unlogged_privileges;
mod review_unlogged_reconvert;
mod review_unlogged_recovery_race;
mod review_wg2_owner_changed;
mod review_wg2_uncommitted_function_hangs_build;
mod review_wg_concurrent_build;
mod review_wg_ddl_replan;
mod review_wg_dollar_quote;
mod review_wg_execute_revoked;
mod review_wg_function_owner;
mod review_wg_long_table_name;
mod review_wg_overload;
mod review_wg_quoted_schema;
mod review_wg_recreated_function;
mod review_wg_schema_swapped;
mod review_wg_trigger_key_leak;
mod stuck_release;
mod stuck_renewal;
mod tls_key_leak;
mod validation;
mod waiting;
mod with_lock;
