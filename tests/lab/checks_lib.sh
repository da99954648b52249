# Shell helpers shared by the in-lab check scripts (sourced, not run).

# wait_for FILE PATTERN SECONDS: polls every half second until PATTERN appears in FILE; fails after
# SECONDS. A FILE that does not exist yet counts as "not yet".
wait_for() {
	_w=0
	while ! grep -q "$2" "$1" 2>/dev/null; do
		_w=$((_w + 1))
		[ $_w -gt $(($3 * 2)) ] && return 1
		sleep 0.5
	done
	return 0
}
