/*
 * labguest: the lab guest's workload. Writes a known pattern and a running
 * counter into its own memory and reports where (guest PFNs) on its console,
 * so dom0 can check what foreign mapping, log-dirty and pause see.
 *
 * Memory it keeps (all pages locked, so their PFNs never change):
 *   PATTERN  LAB_PATTERN_PAGES pages, written once. Page i:
 *              bytes 0..7    "LABPATRN"
 *              bytes 8..15   uint64 i (little-endian)
 *              bytes 16..4095  byte k = (i * 131 + k * 7 + 0x5a) & 0xff
 *   COUNTER  one page: "LABCOUNT", then uint64 counter at byte 8. The counter
 *            is incremented about every millisecond, forever. With a disk:
 *            uint64 at byte 16 = the last disk sequence number whose write
 *            completed (0: none yet), uint64 at byte 24 = the disk's blocks.
 *   DIRTY    LAB_DIRTY_PAGES pages: "LABDIRTY", then uint64 counter at byte 8,
 *            rewritten each time the counter moves (so all of them are dirtied
 *            between any two log-dirty reads a few ms apart).
 *
 * DISK (only if /dev/xvda exists: the lab's disk step gives the guest one)
 *   Every LAB_DISK_EVERY counter increments, write number seq (1, 2, ...)
 *   goes to 4 KiB block b = seq % blocks, O_DIRECT|O_DSYNC (so it has reached
 *   the backend when pwrite returns), and only then is seq stored at byte 16
 *   of the counter page. Block b holds:
 *              bytes 0..7    "LABDISKB"
 *              bytes 8..15   uint64 seq
 *              bytes 16..23  uint64 b
 *              bytes 24..31  uint64 counter when written
 *              bytes 32..4095  byte k = (seq * 13 + k * 7 + 0x3c) & 0xff
 *   So a checker reading the disk can tell, block by block, which write it
 *   holds, and that the disk is one prefix of that sequence (each block holds
 *   the latest seq of its residue up to some point, none after it).
 *
 * Console lines (one per line, parsed by lab/checks/guestlog.py):
 *   LABGUEST PATTERN <pfn of page 0> <pfn of page 1> ...
 *   LABGUEST COUNTER <pfn>
 *   LABGUEST DIRTY <pfn> ...
 *   LABGUEST DISK <blocks>        (with a disk)
 *   LABGUEST READY
 *   LABGUEST TICK <counter>        every LAB_TICK_EVERY increments
 * The PFN lines are repeated every 16 ticks, in case the first were missed.
 *
 * PFNs come from /proc/self/pagemap (bit 63 = present, bits 0-54 = PFN): in
 * a PVH/HVM guest that is the guest frame number dom0 maps; in a PV guest it
 * is the pseudo-physical frame number (dom0 must translate it via the p2m).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define LAB_PATTERN_PAGES 64
#define LAB_DIRTY_PAGES 8
#define LAB_TICK_EVERY 1000
#define LAB_DISK_EVERY 10
#define LAB_DISK_DEV "/dev/xvda"
#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_PFN_MASK ((1ULL << 55) - 1)

static uint64_t pfn_of(int pagemap, const void *addr)
{
    uint64_t entry = 0;
    off_t off = (off_t)((uintptr_t)addr / PAGE) * 8;
    if (pread(pagemap, &entry, 8, off) != 8 || !(entry & PAGEMAP_PRESENT)) {
        fprintf(stderr, "LABGUEST ERROR pagemap %p\n", addr);
        exit(1);
    }
    return entry & PAGEMAP_PFN_MASK;
}

static unsigned char *locked_pages(size_t n)
{
    unsigned char *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
    if (p == MAP_FAILED) {
        perror("LABGUEST ERROR mmap");
        exit(1);
    }
    memset(p, 0, n * PAGE); /* touch every page so each has its own frame */
    return p;
}

static uint64_t disk_blocks; /* 0: no disk */

static void report(int pagemap, unsigned char *pat, unsigned char *cnt, unsigned char *dirty)
{
    printf("LABGUEST PATTERN");
    for (int i = 0; i < LAB_PATTERN_PAGES; i++)
        printf(" %llu", (unsigned long long)pfn_of(pagemap, pat + (size_t)i * PAGE));
    printf("\nLABGUEST COUNTER %llu\nLABGUEST DIRTY", (unsigned long long)pfn_of(pagemap, cnt));
    for (int i = 0; i < LAB_DIRTY_PAGES; i++)
        printf(" %llu", (unsigned long long)pfn_of(pagemap, dirty + (size_t)i * PAGE));
    if (disk_blocks)
        printf("\nLABGUEST DISK %llu", (unsigned long long)disk_blocks);
    printf("\nLABGUEST READY\n");
    fflush(stdout);
}

/* Write number seq to its block; 0 on success. */
static int disk_write(int fd, unsigned char *buf, uint64_t seq, uint64_t counter)
{
    uint64_t b = seq % disk_blocks;
    memcpy(buf, "LABDISKB", 8);
    memcpy(buf + 8, &seq, 8);
    memcpy(buf + 16, &b, 8);
    memcpy(buf + 24, &counter, 8);
    for (unsigned k = 32; k < PAGE; k++)
        buf[k] = (unsigned char)((seq * 13 + k * 7 + 0x3c) & 0xff);
    return pwrite(fd, buf, PAGE, (off_t)(b * PAGE)) == PAGE ? 0 : -1;
}

int main(void)
{
    int pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap < 0) {
        perror("LABGUEST ERROR pagemap");
        return 1;
    }
    if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0)
        perror("LABGUEST WARN mlockall");
    unsigned char *pat = locked_pages(LAB_PATTERN_PAGES);
    unsigned char *cnt = locked_pages(1);
    unsigned char *dirty = locked_pages(LAB_DIRTY_PAGES);

    for (uint64_t i = 0; i < LAB_PATTERN_PAGES; i++) {
        unsigned char *pg = pat + i * PAGE;
        memcpy(pg, "LABPATRN", 8);
        memcpy(pg + 8, &i, 8);
        for (unsigned k = 16; k < PAGE; k++)
            pg[k] = (unsigned char)((i * 131 + k * 7 + 0x5a) & 0xff);
    }
    memcpy(cnt, "LABCOUNT", 8);
    for (int i = 0; i < LAB_DIRTY_PAGES; i++)
        memcpy(dirty + (size_t)i * PAGE, "LABDIRTY", 8);

    int disk = open(LAB_DISK_DEV, O_RDWR | O_DIRECT | O_DSYNC);
    unsigned char *dbuf = NULL;
    uint64_t size = 0;
    if (disk >= 0 && ioctl(disk, BLKGETSIZE64, &size) == 0 && size >= PAGE) {
        disk_blocks = size / PAGE;
        dbuf = locked_pages(1);
        *(volatile uint64_t *)(cnt + 24) = disk_blocks;
    }
    report(pagemap, pat, cnt, dirty);
    struct timespec ms = {0, 1000000};
    uint64_t seq = 0;
    for (uint64_t counter = 1;; counter++) {
        volatile uint64_t *c = (volatile uint64_t *)(cnt + 8);
        *c = counter;
        if (disk_blocks && counter % LAB_DISK_EVERY == 0) {
            if (disk_write(disk, dbuf, seq + 1, counter) == 0) {
                seq++;
                *(volatile uint64_t *)(cnt + 16) = seq;
                if (seq % 1000 == 0) {
                    printf("LABGUEST DISKSEQ %llu\n", (unsigned long long)seq);
                    fflush(stdout);
                }
            } else {
                perror("LABGUEST ERROR disk write");
                sleep(1);
            }
        }
        for (int i = 0; i < LAB_DIRTY_PAGES; i++)
            *(volatile uint64_t *)(dirty + (size_t)i * PAGE + 8) = counter;
        if (counter % LAB_TICK_EVERY == 0) {
            printf("LABGUEST TICK %llu\n", (unsigned long long)counter);
            fflush(stdout);
            if (counter % (16 * LAB_TICK_EVERY) == 0)
                report(pagemap, pat, cnt, dirty);
        }
        nanosleep(&ms, NULL);
    }
}
