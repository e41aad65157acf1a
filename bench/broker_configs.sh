# Sourced by compare.sh and latency_series.sh: the one place both brokers' benchmark
# configurations are written, so every harness compares them under the same limits.
#
# write_broker_configs DIR OUTPOST_PORT MOSQUITTO_PORT INFLIGHT
#   writes DIR/outpost.toml (state in DIR/outpost-state) and DIR/mosquitto.conf
write_broker_configs() {
    local dir=$1 outpost_port=$2 mosquitto_port=$3 inflight=$4
    cat > "$dir/mosquitto.conf" <<CONF
listener $mosquitto_port 127.0.0.1
allow_anonymous true
persistence false
log_type none
log_dest none
connection_messages false
set_tcp_nodelay true
max_inflight_messages $inflight
max_queued_messages 100000
max_connections -1
CONF
    mkdir -p "$dir/outpost-state"
    cat > "$dir/outpost.toml" <<CONF
state_dir = "$dir/outpost-state"
[log]
level = "error"
[broker]
listeners = [{ bind = "127.0.0.1:$outpost_port" }]
allow_anonymous = true
max_inflight = $inflight
receive_maximum = $inflight
max_queued_messages = 100000
# Mosquitto's limits above are "none" for connections and queued bytes; Outpost's
# appliance defaults would bound the idle benchmark's clients from one address.
max_connections = 0
max_connections_per_address = 0
max_sessions = 0
max_queued_bytes = "0"
CONF
}
