/*
 * Kite's test guest, user-mode part (ring 3: runs natively even where guest kernel code
 * is emulated). A minimal virtio-mmio driver (polling, one request in flight)
 * and the scenarios the host selects with `kite.test=NAME` on the command line. Progress
 * goes to the serial port; the verdict to the exit port (0xf4): 0 pass, 1 fail.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define VIRTIO_MMIO_BASE 0xd0000000UL
#define VIRTIO_WINDOW 0x1000UL
#define MAX_DEVICES 8
#define QSIZE 128
/* Requests in flight in the benchmark: three descriptors each. */
#define BATCH (QSIZE / 3)
#define SPIN_LIMIT 2000000000UL

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_MEM 24
/* virtio-mem: the driver promises not to touch unplugged memory (Kite requires it). */
#define MEM_F_UNPLUGGED_INACCESSIBLE 2
#define DESC_NEXT 1
#define DESC_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define STATUS_NEEDS_RESET 64
#define BLK_IN 0
#define BLK_OUT 1
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define SECTOR 512
#define CHUNK (64 * 1024)

/* ---- ports (through the kernel-mode gate, see entry.S) and the console ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("ud2" : : "a"(v), "d"(port) : "memory"); }
static inline void barrier(void) { __asm__ volatile("mfence" : : : "memory"); }

/* Kite's UART takes a byte at once: no need to poll the line status. */
static void putc(char c) { outb(0x3f8, (u8)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void put_hex(u64 v) {
    for (int i = 60; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 0xf]);
}
static void put_dec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(&buf[i]);
}

static __attribute__((noreturn)) void finish(int pass) {
    puts(pass ? "kite-test: PASS\n" : "kite-test: FAIL\n");
    outb(0xf4, pass ? 0 : 1);
    for (;;) {}
}

#define CHECK(cond, msg) do { if (!(cond)) { puts("kite-test: check failed: " msg "\n"); finish(0); } } while (0)

static int str_starts(const char *s, const char *prefix) {
    while (*prefix) if (*s++ != *prefix++) return 0;
    return 1;
}
/* The value of `key` (like "kite.test=") on the command line, or 0. */
static const char *param(const char *cmdline, const char *key) {
    for (const char *p = cmdline; *p; p++)
        if ((p == cmdline || p[-1] == ' ') && str_starts(p, key)) {
            while (*key) key++, p++;
            return p;
        }
    return 0;
}
/* A decimal number up to the first non-digit; at least 1. */
static u64 parse_dec(const char *s) {
    u64 v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    return v ? v : 1;
}
static int str_eq_word(const char *s, const char *word) {
    while (*word) if (*s++ != *word++) return 0;
    return *s == 0 || *s == ' ';
}

/* ---- a virtio-mmio device with one polled queue ---- */
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QSIZE]; u16 avail_event; };

struct queue {
    struct desc desc[QSIZE] __attribute__((aligned(16)));
    struct avail avail __attribute__((aligned(4)));
    struct used used __attribute__((aligned(8)));
};

struct dev {
    u64 base;
    u32 type;
    struct queue *q;
    u16 next_avail;
    u16 used_seen;
};

static struct queue queues[MAX_DEVICES] __attribute__((aligned(4096)));
static struct dev devs[MAX_DEVICES];
static int ndevs;

static inline u32 rd(struct dev *d, u64 off) { return *(volatile u32 *)(d->base + off); }
static inline void wr(struct dev *d, u64 off, u32 v) { *(volatile u32 *)(d->base + off) = v; }

/* Sets the device up with queue 0 of `size` entries, its rings at `desc_addr`,
 * `avail_addr` and `used_addr`; returns 0 if it then needs a reset. */
static int dev_setup_at(struct dev *d, u32 size, u64 desc_addr, u64 avail_addr, u64 used_addr) {
    d->next_avail = 0;
    d->used_seen = 0;
    wr(d, 0x70, 0);
    wr(d, 0x70, 1);
    wr(d, 0x70, 3);
    wr(d, 0x14, 1);
    CHECK(rd(d, 0x10) & 1, "VIRTIO_F_VERSION_1 offered");
    wr(d, 0x24, 0);
    wr(d, 0x20, d->type == VIRTIO_ID_MEM ? MEM_F_UNPLUGGED_INACCESSIBLE : 0);
    wr(d, 0x24, 1);
    wr(d, 0x20, 1);
    wr(d, 0x70, 3 | 8);
    CHECK(rd(d, 0x70) & 8, "FEATURES_OK accepted");
    wr(d, 0x30, 0);
    CHECK(rd(d, 0x34) >= QSIZE, "queue large enough");
    wr(d, 0x38, size);
    wr(d, 0x80, (u32)desc_addr);
    wr(d, 0x84, (u32)(desc_addr >> 32));
    wr(d, 0x90, (u32)avail_addr);
    wr(d, 0x94, (u32)(avail_addr >> 32));
    wr(d, 0xa0, (u32)used_addr);
    wr(d, 0xa4, (u32)(used_addr >> 32));
    wr(d, 0x44, 1);
    wr(d, 0x70, 3 | 8 | 4);
    return !(rd(d, 0x70) & STATUS_NEEDS_RESET);
}

/* Sets the device up with queue 0 of `size` entries, its rings in the device's queue
 * (the descriptor table at `desc_addr`); returns 0 if it then needs a reset. */
static int dev_setup(struct dev *d, u32 size, u64 desc_addr) {
    struct queue *q = d->q;
    u8 *p = (u8 *)q;
    for (u64 i = 0; i < sizeof(*q); i++) p[i] = 0;
    /* The guest polls with interrupts off: tell the device not to send any. */
    q->avail.flags = AVAIL_F_NO_INTERRUPT;
    return dev_setup_at(d, size, desc_addr, (u64)&q->avail, (u64)&q->used);
}

static void dev_setup_ok(struct dev *d) {
    CHECK(dev_setup(d, QSIZE, (u64)d->q->desc), "device set up");
}

static int needs_reset(struct dev *d) { return (rd(d, 0x70) & STATUS_NEEDS_RESET) != 0; }

/* Waits for the device to say it needs a reset (its thread finds the problem); 0 if it
 * never does. */
static int wait_needs_reset(struct dev *d) {
    for (u64 spin = 0; spin < SPIN_LIMIT; spin++) if (needs_reset(d)) return 1;
    return 0;
}

/* Makes the chain at `head` available and waits for its used entry (or a reset need).
 * Returns the used length, or -1 if the device needs a reset instead. */
static long submit(struct dev *d, u16 head) {
    struct queue *q = d->q;
    q->avail.ring[d->next_avail % QSIZE] = head;
    barrier();
    d->next_avail++;
    q->avail.idx = d->next_avail;
    barrier();
    wr(d, 0x50, 0);
    for (u64 spin = 0; spin < SPIN_LIMIT; spin++) {
        barrier();
        if (*(volatile u16 *)&q->used.idx != d->used_seen) {
            struct used_elem e = q->used.ring[d->used_seen % QSIZE];
            d->used_seen++;
            CHECK(e.id == head, "used id is the head");
            return e.len;
        }
        if ((spin & 0xfff) == 0 && needs_reset(d)) return -1;
    }
    CHECK(0, "the device answered in time");
    return -1;
}

static void set_desc(struct dev *d, u16 i, void *addr, u32 len, u16 flags, u16 next) {
    d->q->desc[i].addr = (u64)addr;
    d->q->desc[i].len = len;
    d->q->desc[i].flags = flags;
    d->q->desc[i].next = next;
}

/* ---- block ---- */
struct blk_hdr { u32 type; u32 ioprio; u64 sector; };
static struct blk_hdr hdr;
static volatile u8 blk_status;
static u8 buf[CHUNK] __attribute__((aligned(4096)));

static u64 blk_sectors(struct dev *d) { return (u64)rd(d, 0x100) | ((u64)rd(d, 0x104) << 32); }

static int blk_rw(struct dev *d, u32 type, u64 sector, void *data, u32 len) {
    hdr.type = type;
    hdr.ioprio = 0;
    hdr.sector = sector;
    blk_status = 0xff;
    set_desc(d, 0, &hdr, sizeof(hdr), DESC_NEXT, 1);
    set_desc(d, 1, data, len, DESC_NEXT | (type == BLK_IN ? DESC_WRITE : 0), 2);
    set_desc(d, 2, (void *)&blk_status, 1, DESC_WRITE, 0);
    long used = submit(d, 0);
    CHECK(used >= 0, "block request completed");
    return blk_status;
}

static u8 pattern(int disk, u64 off) { return (u8)((off >> 9) * 131 + off * 7 + (u64)disk * 61); }

static struct dev *find(u32 type, int nth) {
    for (int i = 0; i < ndevs; i++)
        if (devs[i].type == type && nth-- == 0) return &devs[i];
    return 0;
}

/* Writes the pattern over the first `bytes` of disk `disk` and reads it back. */
static void pattern_round_trip(int disk, u64 bytes) {
    struct dev *d = find(VIRTIO_ID_BLOCK, disk);
    CHECK(d, "disk present");
    dev_setup_ok(d);
    u64 size = blk_sectors(d) * SECTOR;
    if (bytes > size) bytes = size;
    for (u64 off = 0; off < bytes; off += CHUNK) {
        for (u32 i = 0; i < CHUNK; i++) buf[i] = pattern(disk, off + i);
        CHECK(blk_rw(d, BLK_OUT, off / SECTOR, buf, CHUNK) == BLK_S_OK, "write ok");
    }
    for (u64 off = 0; off < bytes; off += CHUNK) {
        CHECK(blk_rw(d, BLK_IN, off / SECTOR, buf, CHUNK) == BLK_S_OK, "read ok");
        for (u32 i = 0; i < CHUNK; i++) CHECK(buf[i] == pattern(disk, off + i), "read back the pattern");
    }
    puts("kite-test: disk ");
    put_dec((u64)disk);
    puts(" pattern ok, bytes=");
    put_dec(bytes);
    putc('\n');
}

static void checksum(void) {
    struct dev *d = find(VIRTIO_ID_BLOCK, 0);
    CHECK(d, "disk present");
    dev_setup_ok(d);
    u64 size = blk_sectors(d) * SECTOR, h = 0xcbf29ce484222325UL;
    for (u64 off = 0; off < size; off += CHUNK) {
        u32 len = size - off < CHUNK ? (u32)(size - off) : CHUNK;
        CHECK(blk_rw(d, BLK_IN, off / SECTOR, buf, len) == BLK_S_OK, "read ok");
        for (u32 i = 0; i < len; i++) { h ^= buf[i]; h *= 0x100000001b3UL; }
    }
    puts("kite-test: checksum=");
    put_hex(h);
    putc('\n');
}

static void read_only(void) {
    struct dev *d = find(VIRTIO_ID_BLOCK, 0);
    CHECK(d, "disk present");
    dev_setup_ok(d);
    for (u32 i = 0; i < SECTOR; i++) buf[i] = 0xee;
    CHECK(blk_rw(d, BLK_OUT, 0, buf, SECTOR) == BLK_S_IOERR, "a read-only disk refuses writes");
    CHECK(blk_rw(d, BLK_IN, 0, buf, SECTOR) == BLK_S_OK, "and still reads");
    puts("kite-test: read-only refused the write\n");
}

static void rng(void) {
    struct dev *d = find(VIRTIO_ID_RNG, 0);
    CHECK(d, "rng present");
    dev_setup_ok(d);
    for (int round = 0; round < 4; round++) {
        for (u32 i = 0; i < 64; i++) buf[i] = 0;
        set_desc(d, 0, buf, 64, DESC_WRITE, 0);
        CHECK(submit(d, 0) == 64, "64 random bytes");
        u32 zeros = 0;
        for (u32 i = 0; i < 64; i++) zeros += buf[i] == 0;
        CHECK(zeros < 16, "bytes look random");
    }
    puts("kite-test: rng ok\n");
}

/* A valid read of sector 1, which the host filled with 0x5a; resets the device first if a
 * hostile request left it needing one. */
static void valid_read_after(struct dev *d, const char *what) {
    if (needs_reset(d)) {
        puts("kite-test: needs reset after ");
        puts(what);
        putc('\n');
        dev_setup_ok(d);
    }
    for (u32 i = 0; i < SECTOR; i++) buf[i] = 0;
    CHECK(blk_rw(d, BLK_IN, 1, buf, SECTOR) == BLK_S_OK, "valid read after a hostile request");
    for (u32 i = 0; i < SECTOR; i++) CHECK(buf[i] == 0x5a, "valid data after a hostile request");
    puts("kite-test: survived ");
    puts(what);
    putc('\n');
}

static void hostile(void) {
    struct dev *d = find(VIRTIO_ID_BLOCK, 0);
    CHECK(d, "disk present");
    dev_setup_ok(d);
    hdr.type = BLK_IN;
    hdr.sector = 1;
    static u8 status_ro;

    set_desc(d, 0, &hdr, sizeof(hdr), DESC_NEXT, 1);
    set_desc(d, 1, buf, SECTOR, DESC_NEXT | DESC_WRITE, 0);
    submit(d, 0);
    valid_read_after(d, "a descriptor loop");

    set_desc(d, 0, &hdr, sizeof(hdr), DESC_NEXT, 1);
    set_desc(d, 1, (void *)(64UL << 30), SECTOR, DESC_NEXT | DESC_WRITE, 2);
    set_desc(d, 2, (void *)&blk_status, 1, DESC_WRITE, 0);
    submit(d, 0);
    valid_read_after(d, "an address outside guest memory");

    set_desc(d, 0, &hdr, sizeof(hdr), DESC_NEXT, 1);
    set_desc(d, 1, buf, 0xffffffffU, DESC_NEXT | DESC_WRITE, 2);
    set_desc(d, 2, (void *)&blk_status, 1, DESC_WRITE, 0);
    submit(d, 0);
    valid_read_after(d, "a 4 GiB length");

    set_desc(d, 0, &hdr, sizeof(hdr), DESC_NEXT | DESC_WRITE, 1);
    set_desc(d, 1, &status_ro, 1, 0, 0);
    submit(d, 0);
    valid_read_after(d, "wrong descriptor directions");

    set_desc(d, 0, &hdr, sizeof(hdr), DESC_NEXT, 1000);
    submit(d, 0);
    valid_read_after(d, "a next index beyond the queue");

    /* A chain longer than the queue: every descriptor chained to the next, around. */
    for (u16 i = 0; i < QSIZE; i++) set_desc(d, i, buf, 64, DESC_NEXT, (u16)((i + 1) % QSIZE));
    submit(d, 0);
    valid_read_after(d, "a chain longer than the queue");

    CHECK(!dev_setup(d, 15, (u64)d->q->desc), "a queue size of 15 needs a reset");
    valid_read_after(d, "a queue size that is not a power of two");

    dev_setup(d, QSIZE, 1UL << 40);
    CHECK(wait_needs_reset(d), "rings outside guest memory need a reset");
    valid_read_after(d, "rings outside guest memory");

    /* The available index jumps by more than the queue holds. */
    d->q->avail.idx = (u16)(d->next_avail + 1000);
    barrier();
    wr(d, 0x50, 0);
    CHECK(wait_needs_reset(d), "a corrupt available index needs a reset");
    valid_read_after(d, "a corrupt available index");
}

/* Each request's header and status in a cache line of its own, as Linux keeps them in
 * its per-request data: the device writing one status does not steal the line the
 * driver is reading another from. */
static struct req { struct blk_hdr hdr; volatile u8 status; } __attribute__((aligned(64))) reqs[BATCH];
static u8 batch_buf[BATCH][CHUNK] __attribute__((aligned(4096)));

#define USED_F_NO_NOTIFY 1

/* Fills request slot `n` (descriptors 3n..3n+2) with a `len`-byte request at disk offset
 * `off` and adds it to the available ring; `publish` makes it visible. Reads land in the
 * slot's own buffer; writes all send buffer 0 (the device only reads it), so the guest
 * writes from one buffer, as the host's direct-path baseline does. */
static void queue_slot(struct dev *d, u16 n, u32 type, u64 off, u32 len) {
    u16 base = (u16)(3 * n);
    reqs[n].hdr.type = type;
    reqs[n].hdr.ioprio = 0;
    reqs[n].hdr.sector = off / SECTOR;
    reqs[n].status = 0xff;
    set_desc(d, base, &reqs[n].hdr, sizeof(reqs[n].hdr), DESC_NEXT, base + 1);
    set_desc(d, base + 1, batch_buf[type == BLK_IN ? n : 0], len, DESC_NEXT | (type == BLK_IN ? DESC_WRITE : 0), base + 2);
    set_desc(d, base + 2, (void *)&reqs[n].status, 1, DESC_WRITE, 0);
    d->q->avail.ring[d->next_avail % QSIZE] = base;
    d->next_avail++;
}

/* Publishes the available index; notifies the device unless it said it is still working
 * through the ring (it checks the ring again before it sleeps). */
static void publish(struct dev *d) {
    barrier();
    d->q->avail.idx = d->next_avail;
    barrier();
    if (!(*(volatile u16 *)&d->q->used.flags & USED_F_NO_NOTIFY)) wr(d, 0x50, 0);
}

/* Sequential requests of `len` bytes over the first `size` bytes of the disk, `passes`
 * times, with BATCH in flight: each completed slot is refilled at once, as a real driver
 * keeps its queue full. Returns the requests done. */
static u64 blk_stream(struct dev *d, u32 type, u64 size, u32 len, u64 passes) {
    struct queue *q = d->q;
    u64 total = size / len * passes, issued = 0, done = 0;
    for (u16 n = 0; n < BATCH && issued < total; n++, issued++)
        queue_slot(d, n, type, issued * len % size, len);
    publish(d);
    u64 spin = 0;
    while (done < total) {
        u16 used_idx = *(volatile u16 *)&q->used.idx;
        barrier();
        if (used_idx == d->used_seen) {
            CHECK(++spin < SPIN_LIMIT, "the requests completed in time");
            __asm__ volatile("pause");
            continue;
        }
        spin = 0;
        int refilled = 0;
        for (; d->used_seen != used_idx; d->used_seen++, done++) {
            u16 n = (u16)(q->used.ring[d->used_seen % QSIZE].id / 3);
            CHECK(n < BATCH && reqs[n].status == BLK_S_OK, "request ok");
            if (issued < total) {
                queue_slot(d, n, type, issued * len % size, len);
                issued++;
                refilled = 1;
            }
        }
        if (refilled) publish(d);
    }
    return done;
}

/* Markers the host times: sequential 64 KiB writes then reads over the whole disk, then
 * 4 KiB reads, each `kite.passes=` times (default 1). The buffers are written first, as
 * a running system's would have been. */
static void bench(u64 passes) {
    struct dev *d = find(VIRTIO_ID_BLOCK, 0);
    CHECK(d, "disk present");
    dev_setup_ok(d);
    for (u64 i = 0; i < sizeof(batch_buf); i++) ((u8 *)batch_buf)[i] = (u8)(i * 7);
    u64 size = blk_sectors(d) * SECTOR;
    puts("kite-bench: write64k start\n");
    blk_stream(d, BLK_OUT, size, CHUNK, passes);
    puts("kite-bench: write64k end\nkite-bench: read64k start\n");
    blk_stream(d, BLK_IN, size, CHUNK, passes);
    puts("kite-bench: read64k end\nkite-bench: read4k start\n");
    u64 n = blk_stream(d, BLK_IN, size, 4096, passes);
    puts("kite-bench: read4k end requests=");
    put_dec(n);
    putc('\n');
}

/* ---- virtio-mem: follow the host's requested size, under load ---- */
#define MEM_PLUG 0
#define MEM_UNPLUG 1
#define MEM_STATE 3
#define MEM_ACK 0
#define MEM_NACK 1
#define MEM_BUSY 2
#define MEM_ERROR 3
#define MEM_STATE_PLUGGED 0
#define MAX_BLOCKS 1024

struct mem_req { u16 type; u16 pad[3]; u64 addr; u16 nb_blocks; u16 pad2[3]; };
struct mem_resp { u16 type; u16 pad[3]; u16 state; };
static struct mem_req mreq;
static volatile struct mem_resp mresp;
static u8 plugged_blocks[MAX_BLOCKS];
static u64 block_gen[MAX_BLOCKS];

static u64 cfg64(struct dev *d, u64 off) { return (u64)rd(d, 0x100 + off) | ((u64)rd(d, 0x104 + off) << 32); }

static u16 mem_request_n(struct dev *d, u16 type, u64 addr, u16 blocks) {
    mreq.type = type;
    mreq.addr = addr;
    mreq.nb_blocks = blocks;
    mresp.type = 0xffff;
    set_desc(d, 0, &mreq, sizeof(mreq), DESC_NEXT, 1);
    set_desc(d, 1, (void *)&mresp, sizeof(mresp), DESC_WRITE, 0);
    CHECK(submit(d, 0) >= 0, "virtio-mem request completed");
    return mresp.type;
}

static u16 mem_request(struct dev *d, u16 type, u64 addr) { return mem_request_n(d, type, addr, 1); }

static u64 word_for(u64 *p, u64 gen) { return ((u64)p * 0x9e3779b97f4a7c15UL) ^ gen; }

static void fill_block(u64 base, u64 size, u64 gen) {
    for (u64 *p = (u64 *)base; p < (u64 *)(base + size); p++) *p = word_for(p, gen);
}

static void verify_block(u64 base, u64 size, u64 gen) {
    for (u64 *p = (u64 *)base; p < (u64 *)(base + size); p++)
        CHECK(*p == word_for(p, gen), "plugged memory keeps what was written");
}

/* The state of a guest that follows virtio-mem's requested size under load: the
 * `hotplug` and `snapshot` scenarios. Everything lives in guest memory (this struct, the
 * block tables, the queues), so a snapshot of the VM takes all of it along. */
struct follower {
    struct dev *m, *b;
    u64 block, addr, nblocks, disk;
    u64 plugged, requested, round_trips, pass, gen;
    u64 last_pass, last_off;
};

/* `kite.plug=never`: the follower plugs no block, whatever is requested (unplugs still
 * work): a resize towards more memory stays under way for as long as the host wants,
 * for the tests of what Kite does meanwhile. */
static int never_plug;

static void follow_init(struct follower *f) {
    f->m = find(VIRTIO_ID_MEM, 0);
    f->b = find(VIRTIO_ID_BLOCK, 0);
    CHECK(f->m && f->b, "virtio-mem and a disk present");
    dev_setup_ok(f->m);
    dev_setup_ok(f->b);
    f->block = cfg64(f->m, 0);
    f->addr = cfg64(f->m, 16);
    f->nblocks = cfg64(f->m, 24) / f->block;
    CHECK(f->nblocks <= MAX_BLOCKS && f->block >= 4096 && f->block > CHUNK, "a hotplug area this guest can track");
    f->disk = blk_sectors(f->b) * SECTOR;
    CHECK(f->disk >= CHUNK, "a disk of at least 64 KiB");
    f->plugged = f->requested = f->round_trips = f->pass = 0;
    f->gen = 1;
    f->last_pass = f->last_off = 0;
}

static u64 block_base(struct follower *f, u64 i) { return f->addr + i * f->block; }

/* Block `i` keeps the pattern written when it was plugged (all but its last CHUNK, the
 * disk buffer). */
static void verify_plugged(struct follower *f, u64 i) {
    verify_block(block_base(f, i), f->block - CHUNK, block_gen[i]);
}

static int follow_settled(struct follower *f) { return f->requested == f->plugged * f->block; }

/* One pass: plugs or unplugs one block towards the requested size; writes a fresh
 * pattern into each block it plugs (all but its last CHUNK) and checks it before
 * unplugging; checks one plugged block when settled; and does a virtio-blk round trip,
 * through the last CHUNK of the highest plugged block when there is one (so the device
 * thread's copies touch hotplugged memory, lazily populated or not). */
static void follow_pass(struct follower *f) {
    struct dev *m = f->m, *b = f->b;
    u64 pass = ++f->pass;
    u64 requested = f->requested = cfg64(m, 48);
    if (requested > f->plugged * f->block && !never_plug) {
        for (u64 i = 0; i < f->nblocks; i++) {
            if (plugged_blocks[i]) continue;
            u16 r = mem_request(m, MEM_PLUG, block_base(f, i));
            if (r == MEM_ACK) {
                plugged_blocks[i] = 1;
                block_gen[i] = f->gen++;
                fill_block(block_base(f, i), f->block - CHUNK, block_gen[i]);
                f->plugged++;
            }
            break;
        }
    } else if (requested < f->plugged * f->block) {
        for (u64 i = f->nblocks; i-- > 0;) {
            if (!plugged_blocks[i]) continue;
            verify_plugged(f, i);
            u16 r = mem_request(m, MEM_UNPLUG, block_base(f, i));
            CHECK(r == MEM_ACK || r == MEM_BUSY, "unplug acknowledged or busy");
            if (r == MEM_ACK) { plugged_blocks[i] = 0; f->plugged--; }
            break;
        }
    } else if (f->plugged) {
        u64 i = pass % f->nblocks;
        if (plugged_blocks[i]) verify_plugged(f, i);
    }
    /* The disk round trip, at a place that moves, through hotplugged memory if any:
     * first read back what the last pass wrote (for a freshly plugged block, the
     * device thread is the first to touch those pages), then write this pass's. */
    u8 *io = buf;
    for (u64 i = f->nblocks; i-- > 0;)
        if (plugged_blocks[i]) { io = (u8 *)(block_base(f, i + 1) - CHUNK); break; }
    if (f->last_pass) {
        CHECK(blk_rw(b, BLK_IN, f->last_off / SECTOR, io, CHUNK) == BLK_S_OK, "disk read");
        for (u32 i = 0; i < CHUNK; i++) CHECK(io[i] == (u8)(f->last_pass * 13 + i), "disk data");
    }
    u64 off = (pass * CHUNK) % (f->disk - CHUNK + 1) / SECTOR * SECTOR;
    for (u32 i = 0; i < CHUNK; i++) io[i] = (u8)(pass * 13 + i);
    CHECK(blk_rw(b, BLK_OUT, off / SECTOR, io, CHUNK) == BLK_S_OK, "disk write");
    f->last_pass = pass;
    f->last_off = off;
    f->round_trips++;
}

/* Follows the requested size (follow_pass) until the host stops the VM. */
static void hotplug(void) {
    static struct follower f;
    follow_init(&f);
    puts("kite-test: hotplug ready\n");
    for (;;) {
        follow_pass(&f);
        if (follow_settled(&f) && (f.pass & 63) == 0) {
            puts("kite-test: hotplug steady plugged_mib=");
            put_dec(f.plugged * f.block >> 20);
            puts(" round_trips=");
            put_dec(f.round_trips);
            putc('\n');
        }
    }
}

/* ---- snapshot: memory written before a snapshot must be there after a restore ----
 * Boot RAM the snapshot scenario fills: 32 MiB from 64 MiB guest-physical. Nothing else
 * uses it: Kite's boot data (GDT, zero page, boot page tables, command line, MP table) is
 * below 1 MiB, this guest's image (code, data, queues, buffers, its own page tables and
 * stacks, all in .bss) is at 2 MiB and ends below BOOT_FILL_START (checked against the
 * linker's `_end`), the test guest has no initramfs, and the virtio-mmio windows and the
 * hotplug area are far above RAM. entry.S maps the first 16 GiB with user-accessible
 * 2 MiB pages, so the range is mapped; the e820 map must show it as RAM (at least 96 MiB
 * of boot RAM, checked). */
#define BOOT_FILL_START (64UL << 20)
#define BOOT_FILL_SIZE (32UL << 20)
/* Verified per pass: one slice, in turn; all of it at the end. */
#define BOOT_SLICE (64UL << 10)
#define BOOT_SLICES (BOOT_FILL_SIZE / BOOT_SLICE)

extern char _end[];
static u64 boot_seed;

/* The boot-RAM pattern: every word different, depending on its address and the seed. */
static u64 boot_word(u64 *p) {
    u64 x = ((u64)p ^ boot_seed) * 0xff51afd7ed558ccdUL;
    return x ^ (x >> 29) ^ boot_seed;
}

static void verify_boot_ram(u64 start, u64 size) {
    for (u64 *p = (u64 *)start; p < (u64 *)(start + size); p++)
        CHECK(*p == boot_word(p), "boot RAM keeps its pattern");
}

/* Whether the zero page's e820 map (entries at 0x2d0, their count at 0x1e8) has RAM over
 * [start, end). */
struct e820_entry { u64 addr; u64 size; u32 type; } __attribute__((packed));
static int e820_ram_covers(const u8 *zero_page, u64 start, u64 end) {
    const struct e820_entry *e = (const struct e820_entry *)(zero_page + 0x2d0);
    for (u32 i = 0; i < zero_page[0x1e8] && i < 128; i++)
        if (e[i].type == 1 && e[i].addr <= start && end <= e[i].addr + e[i].size) return 1;
    return 0;
}

static void snapshot_steady(const char *what, struct follower *f) {
    puts("kite-test: snapshot ");
    puts(what);
    puts(" plugged_mib=");
    put_dec(f->plugged * f->block >> 20);
    puts(" passes=");
    put_dec(f->pass);
    putc('\n');
}

/* Like hotplug (the same passes: plug/unplug towards the requested size with patterns,
 * a disk round trip each pass), over a boot-RAM pattern filled at the start: one slice of
 * it is checked every pass. Prints `snapshot ready` once set up and `snapshot steady
 * plugged_mib=N passes=P` every 64 passes while settled. Once the whole hotplug area is
 * requested and plugged, checks every plugged block and all of the boot-RAM pattern,
 * prints `snapshot verified plugged_mib=N passes=P` and passes. Made for a host that
 * snapshots the VM mid-load and restores it elsewhere: whatever was written before the
 * snapshot must still be there after the restore.
 *
 * `kite.flip=boot-ram` (for the test that shows the checks can fail): once the requested
 * size first grows past what it was at the start, the guest flips one bit of the
 * boot-RAM word the next pass checks, as a restore that lost a write would.
 *
 * `kite.plug=never` (for the tests of a snapshot asked for during a resize): no block is
 * plugged; while more is requested than plugged, `snapshot holding plugged_mib=N
 * passes=P` every 64 passes instead. */
static void snapshot(const u8 *zero_page, const char *flip) {
    static struct follower f;
    CHECK((u64)_end <= BOOT_FILL_START, "the guest image ends below the boot-RAM pattern");
    CHECK(e820_ram_covers(zero_page, BOOT_FILL_START, BOOT_FILL_START + BOOT_FILL_SIZE),
          "boot RAM covers the pattern (at least 96 MiB)");
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    boot_seed = (((u64)hi << 32 | lo) * 0x9e3779b97f4a7c15UL) | 1;
    for (u64 *p = (u64 *)BOOT_FILL_START; p < (u64 *)(BOOT_FILL_START + BOOT_FILL_SIZE); p++) *p = boot_word(p);
    follow_init(&f);
    u64 initial = cfg64(f.m, 48);
    int flip_pending = flip && str_eq_word(flip, "boot-ram");
    puts("kite-test: snapshot boot_ram=0x");
    put_hex(BOOT_FILL_START);
    puts("+0x");
    put_hex(BOOT_FILL_SIZE);
    puts(" seed=0x");
    put_hex(boot_seed);
    putc('\n');
    puts("kite-test: snapshot ready\n");
    for (;;) {
        follow_pass(&f);
        verify_boot_ram(BOOT_FILL_START + f.pass % BOOT_SLICES * BOOT_SLICE, BOOT_SLICE);
        if (flip_pending && f.requested > initial) {
            u64 *word = (u64 *)(BOOT_FILL_START + (f.pass + 1) % BOOT_SLICES * BOOT_SLICE + 8 * 1000);
            *word ^= 1UL << 17;
            flip_pending = 0;
            puts("kite-test: snapshot flipped a boot-RAM bit\n");
        }
        if (!follow_settled(&f)) {
            if (never_plug && (f.pass & 63) == 0) snapshot_steady("holding", &f);
            continue;
        }
        if (f.requested == f.nblocks * f.block && f.plugged == f.nblocks) {
            for (u64 i = 0; i < f.nblocks; i++) {
                CHECK(plugged_blocks[i], "every block plugged");
                verify_plugged(&f, i);
            }
            verify_boot_ram(BOOT_FILL_START, BOOT_FILL_SIZE);
            snapshot_steady("verified", &f);
            finish(1);
        }
        if ((f.pass & 63) == 0) snapshot_steady("steady", &f);
    }
}

/* Writes to the first block of the hotplug area without plugging it: the guest breaks
 * its word (VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE), and Kite must stop it. */
static void touch_unplugged(void) {
    struct dev *m = find(VIRTIO_ID_MEM, 0);
    CHECK(m, "virtio-mem present");
    dev_setup_ok(m);
    volatile u64 *addr = (volatile u64 *)cfg64(m, 16);
    puts("kite-test: writing to unplugged memory\n");
    *addr = 0x6b697465;
    CHECK(0, "the write to unplugged memory was stopped");
}

/* A driver that turns hotplugged memory against the devices: virtio-mem requests it gets
 * wrong; rings and buffers of virtio-blk and virtio-rng in blocks that are then
 * unplugged. Each must fail alone (an error status, a used length of 0, or a device that
 * needs a reset), and the devices work again after. Needs two blocks requested at boot,
 * a disk whose sector 1 is 0x5a, and an rng. */
static void hostile_hotplug(void) {
    struct dev *m = find(VIRTIO_ID_MEM, 0), *b = find(VIRTIO_ID_BLOCK, 0), *r = find(VIRTIO_ID_RNG, 0);
    CHECK(m && b && r, "virtio-mem, a disk and an rng present");
    dev_setup_ok(m);
    u64 block = cfg64(m, 0), area = cfg64(m, 16), area_size = cfg64(m, 24);
    CHECK(cfg64(m, 48) == 2 * block, "two blocks requested at boot");
    CHECK(mem_request_n(m, MEM_PLUG, area, 2) == MEM_ACK, "two blocks plugged");
    u64 b0 = area, b1 = area + block;

    CHECK(mem_request(m, MEM_PLUG, area + 1) == MEM_ERROR, "an unaligned plug is an error");
    CHECK(mem_request(m, MEM_PLUG, area - block) == MEM_ERROR, "a plug below the area is an error");
    CHECK(mem_request(m, MEM_PLUG, area + area_size) == MEM_ERROR, "a plug beyond the area is an error");
    CHECK(mem_request_n(m, MEM_PLUG, area + 2 * block, 0xffff) == MEM_ERROR, "65535 blocks is an error");
    CHECK(mem_request_n(m, MEM_PLUG, area, 0) == MEM_ERROR, "0 blocks is an error");
    CHECK(mem_request(m, MEM_PLUG, area + 2 * block) == MEM_NACK, "a plug beyond the request is refused");
    CHECK(mem_request(m, MEM_UNPLUG, area + 3 * block) == MEM_ERROR, "unplugging an unplugged block is an error");
    CHECK(mem_request(m, 77, area) == MEM_ERROR, "an unknown request is an error");
    /* A response buffer too short for a response: none is written. */
    mresp.type = 0xffff;
    set_desc(m, 0, &mreq, sizeof(mreq), DESC_NEXT, 1);
    set_desc(m, 1, (void *)&mresp, 4, DESC_WRITE, 0);
    CHECK(submit(m, 0) == 0 && mresp.type == 0xffff, "no response into a short buffer");
    /* A descriptor loop. */
    set_desc(m, 0, &mreq, sizeof(mreq), DESC_NEXT, 0);
    CHECK(submit(m, 0) == 0, "no response to a descriptor loop");
    CHECK(!needs_reset(m), "virtio-mem still works");
    CHECK(mem_request_n(m, MEM_STATE, area, 2) == MEM_ACK && mresp.state == MEM_STATE_PLUGGED,
          "both blocks still plugged");
    CHECK(cfg64(m, 40) == 2 * block, "the plugged size did not change");
    puts("kite-test: survived hostile virtio-mem requests\n");

    /* virtio-blk: a read into a plugged block works; into the same block unplugged, and a
     * write from it, fail alone. */
    dev_setup_ok(b);
    for (u32 i = 0; i < SECTOR; i++) ((volatile u8 *)b1)[i] = 0;
    CHECK(blk_rw(b, BLK_IN, 1, (void *)b1, SECTOR) == BLK_S_OK, "a read into a plugged block");
    CHECK(((volatile u8 *)b1)[SECTOR - 1] == 0x5a, "lands there");
    CHECK(mem_request(m, MEM_UNPLUG, b1) == MEM_ACK, "block 1 unplugged");
    CHECK(blk_rw(b, BLK_IN, 1, (void *)b1, SECTOR) == BLK_S_IOERR, "a read into an unplugged block fails");
    CHECK(blk_rw(b, BLK_OUT, 2, (void *)b1, SECTOR) == BLK_S_IOERR, "a write from an unplugged block fails");
    valid_read_after(b, "buffers in an unplugged block");

    /* An available ring whose header ends block 0 and whose entries begin block 1: block
     * 1 goes, then the driver announces a request whose entry the device cannot read. */
    CHECK(mem_request(m, MEM_PLUG, b1) == MEM_ACK, "block 1 plugged again");
    CHECK(*(volatile u64 *)b1 == 0, "plugged again, it reads as zeros");
    volatile u16 *avail = (volatile u16 *)(b1 - 4);
    avail[0] = AVAIL_F_NO_INTERRUPT;
    avail[1] = 0;
    avail[2] = 0; /* ring[0]: the chain at descriptor 0 */
    hdr.type = BLK_IN;
    hdr.sector = 1;
    set_desc(b, 0, &hdr, sizeof(hdr), DESC_NEXT, 1);
    set_desc(b, 1, buf, SECTOR, DESC_NEXT | DESC_WRITE, 2);
    set_desc(b, 2, (void *)&blk_status, 1, DESC_WRITE, 0);
    CHECK(dev_setup_at(b, QSIZE, (u64)b->q->desc, b1 - 4, (u64)&b->q->used), "rings across two blocks");
    CHECK(mem_request(m, MEM_UNPLUG, b1) == MEM_ACK, "block 1 unplugged under the ring");
    barrier();
    avail[1] = 1;
    barrier();
    wr(b, 0x50, 0);
    CHECK(wait_needs_reset(b), "an available ring reaching into unplugged memory needs a reset");
    valid_read_after(b, "an available ring reaching into an unplugged block");

    /* A descriptor table in a block unplugged after it was set up: the chain cannot be
     * read, the request gets no used length. */
    struct desc *table = (struct desc *)b0;
    table[0].addr = (u64)buf;
    table[0].len = 64;
    table[0].flags = DESC_WRITE;
    table[0].next = 0;
    CHECK(dev_setup(r, QSIZE, b0), "rng with its descriptors in block 0");
    CHECK(mem_request(m, MEM_UNPLUG, b0) == MEM_ACK, "block 0 unplugged under the descriptors");
    long used = submit(r, 0);
    CHECK(used == 0 || (used < 0 && needs_reset(r)), "no random bytes through unplugged descriptors");

    /* virtio-rng buffers: unplugged, read-only, 4 GiB long, looping. */
    dev_setup_ok(r);
    set_desc(r, 0, (void *)b1, 64, DESC_WRITE, 0);
    CHECK(submit(r, 0) == 0, "no random bytes into an unplugged block");
    set_desc(r, 0, buf, 64, 0, 0);
    CHECK(submit(r, 0) == 0, "no random bytes into a device-readable buffer");
    set_desc(r, 0, buf, 0xffffffffU, DESC_WRITE, 0);
    CHECK(submit(r, 0) <= 65536, "at most 64 KiB into a 4 GiB buffer");
    set_desc(r, 0, buf, 64, DESC_WRITE | DESC_NEXT, 0);
    submit(r, 0);
    if (needs_reset(r)) dev_setup_ok(r);
    for (u32 i = 0; i < 64; i++) buf[i] = 0;
    set_desc(r, 0, buf, 64, DESC_WRITE, 0);
    CHECK(submit(r, 0) == 64, "random bytes after it all");
    puts("kite-test: survived rings and buffers in unplugged memory\n");
}

/* Plugs a block, uses it, unplugs it and writes to it anyway: Kite must stop the guest. */
static void touch_after_unplug(void) {
    struct dev *m = find(VIRTIO_ID_MEM, 0);
    CHECK(m, "virtio-mem present");
    dev_setup_ok(m);
    u64 area = cfg64(m, 16);
    CHECK(mem_request(m, MEM_PLUG, area) == MEM_ACK, "a block plugged");
    volatile u64 *addr = (volatile u64 *)area;
    *addr = 0x6b697465;
    CHECK(*addr == 0x6b697465, "plugged memory holds a write");
    CHECK(mem_request(m, MEM_UNPLUG, area) == MEM_ACK, "and unplugged");
    puts("kite-test: writing to memory unplugged after use\n");
    *addr = 0x6b697465;
    CHECK(0, "the write to unplugged memory was stopped");
}

static void probe(void) {
    for (int i = 0; i < MAX_DEVICES; i++) {
        struct dev *d = &devs[ndevs];
        d->base = VIRTIO_MMIO_BASE + (u64)i * VIRTIO_WINDOW;
        d->q = &queues[ndevs];
        if (rd(d, 0) != 0x74726976 || rd(d, 4) != 2) break;
        d->type = rd(d, 8);
        ndevs++;
    }
}

void guest_main(const u8 *zero_page) {
    const char *cmdline = (const char *)(u64)*(const u32 *)(zero_page + 0x228);
    const char *test = param(cmdline, "kite.test=");
    const char *passes = param(cmdline, "kite.passes=");
    const char *flip = param(cmdline, "kite.flip=");
    const char *plug = param(cmdline, "kite.plug=");
    never_plug = plug && str_eq_word(plug, "never");
    puts("kite-test: guest up\n");
    CHECK(test, "kite.test= on the command line");
    probe();
    if (str_eq_word(test, "blk-pattern")) pattern_round_trip(0, 4UL << 20);
    else if (str_eq_word(test, "blk-two")) { pattern_round_trip(0, 1UL << 20); pattern_round_trip(1, 1UL << 20); }
    else if (str_eq_word(test, "blk-checksum")) checksum();
    else if (str_eq_word(test, "blk-readonly")) read_only();
    else if (str_eq_word(test, "rng")) rng();
    else if (str_eq_word(test, "hostile")) hostile();
    else if (str_eq_word(test, "bench")) bench(passes ? parse_dec(passes) : 1);
    else if (str_eq_word(test, "hotplug")) hotplug();
    else if (str_eq_word(test, "snapshot")) snapshot(zero_page, flip);
    else if (str_eq_word(test, "touch-unplugged")) touch_unplugged();
    else if (str_eq_word(test, "hostile-hotplug")) hostile_hotplug();
    else if (str_eq_word(test, "touch-after-unplug")) touch_after_unplug();
    else CHECK(0, "a known test name");
    finish(1);
}
