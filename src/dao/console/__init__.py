"""``dao console``: the web console that pools a user's Docker hosts (issue 14). So far its agents' side:
enrolment, the agent channel, the hosts and their metrics; the pages come next."""
