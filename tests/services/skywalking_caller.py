"""A caller instrumented by Apache SkyWalking's own Python agent (not payscope, not OpenTelemetry): each of
``N`` requests to ``URL`` runs in a SkyWalking entry span, so the agent's requests plugin sends ``sw8``.
Prints, for each, the SkyWalking trace id and the answer."""

import json
import sys

from skywalking import agent, config

# no SkyWalking backend runs here: the reporter's address is a closed port, and its errors are not ours
config.init(agent_collector_backend_services="127.0.0.1:9", agent_name="storefront", agent_protocol="http",
            agent_logging_level="CRITICAL", agent_meter_reporter_active=False, agent_profile_active=False,
            agent_log_reporter_active=False)
agent.start()

import requests  # noqa: E402 - after the agent, which instruments it
from skywalking.trace.context import get_context  # noqa: E402

out = []
for _ in range(int(sys.argv[2])):
    context = get_context()
    with context.new_entry_span(op="/checkout"):
        answer = requests.get(sys.argv[1], timeout=10)
        answer.raise_for_status()
        out.append({"trace": str(context.segment.related_traces[0]), "answer": answer.json()})
print(json.dumps(out), flush=True)
