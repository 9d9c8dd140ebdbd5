from twisted.application.service import ServiceMaker

gitstratum_standalone = ServiceMaker(
    "GitStratum standalone",
    "gitstratum.standalone.tap",
    "Every GitStratum tier in one process: Git over smart HTTP, admin API, LMDB storage.",
    "gitstratum-standalone",
)

gitstratum_control = ServiceMaker(
    "GitStratum control",
    "gitstratum.control.tap",
    "A control-plane node: membership and rings on Raft.",
    "gitstratum-control",
)

gitstratum_metadata = ServiceMaker(
    "GitStratum metadata node",
    "gitstratum.metadata.tap",
    "A metadata tier node of a GitStratum cluster (membership only, for now).",
    "gitstratum-metadata",
)

gitstratum_object = ServiceMaker(
    "GitStratum object node",
    "gitstratum.objects.tap",
    "An object tier node of a GitStratum cluster (membership only, for now).",
    "gitstratum-object",
)

gitstratum_frontend = ServiceMaker(
    "GitStratum cluster frontend",
    "gitstratum.frontend.cluster_tap",
    "A frontend of a GitStratum cluster (membership only, for now).",
    "gitstratum-frontend",
)
